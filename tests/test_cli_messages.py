"""What the commands say to someone meeting them: help texts, and errors for the first
mistakes a newcomer makes."""

import os

import pytest

from tests.conftest import REPO
from tests.launch import DANUBE_LAUNCH, launch


def test_pretrain_without_config_names_the_missing_flag(capsys):
    import signal

    from megatron_danube.pretrain import main

    # The command installs its stop handlers in this process: give pytest its own back.
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([])
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("danube-pretrain: error: no --config given; pass --config FILE.yaml")


def test_config_reference_takes_help_and_refuses_unknown_arguments(capsys):
    from megatron_danube.cli.config_reference import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "print the configuration reference" in capsys.readouterr().out


def test_descriptions_are_whole_sentences(capsys):
    from megatron_danube.cli import compare, convert

    for command, tail in ((compare, "and KL divergence."), (convert, "and Hugging Face.")):
        with pytest.raises(SystemExit):
            command.command(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert tail in out
    with pytest.raises(SystemExit):
        convert.command(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "hf: a megatron_danube run or checkpoint to an HF directory" in out


def test_launch_help_says_how_it_differs_from_torchrun():
    from megatron_danube.cli.launch import parser

    text = " ".join(parser().format_help().split())
    assert text.startswith("usage: danube-launch")
    assert "a stop signal means" in text and "a bad config is one line and exit 2" in text


def test_convert_to_hf_from_an_hf_directory_suggests_to_mcore(tmp_path, capsys):
    from megatron_danube.cli.convert import command

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert command(["--to", "hf", "--load", str(hf), "--save", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a Hugging Face model directory (config.json); did you mean --to mcore?" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # launches 2 processes
def test_launch_with_a_bad_config_prints_one_line_and_exits_2(tmp_path):
    proc = launch(
        "megatron_danube.pretrain",
        "--config",
        os.path.join(REPO, "examples", "configs", "danube-tiny-cpu.yaml"),
        f"run_dir={tmp_path / 'run'}",
        "train.micro_batch_sise=3",
        nproc=2,
        launcher=DANUBE_LAUNCH,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [
        "danube-pretrain: error: unknown config key 'train.micro_batch_sise'; "
        "did you mean 'train.micro_batch_size'?"
    ]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
