"""Bad input: one line naming the problem and the fix, before the model is built where the
input can be checked up front; nothing written is lost. What the preflight refuses is checked
in this process; the command line (exit 2, the line once, no traceback) once per family."""

import json
import os
import shutil
import signal
import stat

import numpy as np
import pytest

from tests.conftest import wait_for
from tests.launch import launch, run_pretrain
from tests.training.conftest import plan_error, pretrain_overrides

pytestmark = pytest.mark.slow
ONE = dict(nproc=1, check=False)


def _error_line(proc):
    """The single error line; fails when there is a traceback or more than one line."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "model danube" not in proc.stdout  # refused before the model was built
    return lines[0]


def test_config_value_error_is_one_line_before_anything_runs(tmp_path, corpora):
    line = _error_line(run_pretrain(tmp_path / "r", corpora, "logging.log_interval=0", **ONE))
    assert "logging.log_interval=0; it must be >= 1" in line


@pytest.mark.parametrize(
    "damage,expected",
    [
        ("idx_magic", "is not a Megatron index file"),
        ("idx_truncated", "is truncated or damaged"),
        ("bin_truncated", "the file is truncated"),
    ],
)
def test_damaged_dataset_files(tmp_path, corpora, damage, expected):
    prefix = tmp_path / "copy_text_document"
    for ext in (".bin", ".idx"):
        shutil.copy(corpora[0] + ext, str(prefix) + ext)
    if damage == "idx_magic":
        data = bytearray((tmp_path / "copy_text_document.idx").read_bytes())
        data[:4] = b"XXXX"
        (tmp_path / "copy_text_document.idx").write_bytes(bytes(data))
    elif damage == "idx_truncated":
        path = tmp_path / "copy_text_document.idx"
        path.write_bytes(path.read_bytes()[:-20])
    else:
        path = tmp_path / "copy_text_document.bin"
        path.write_bytes(path.read_bytes()[:100])
    assert expected in plan_error(*pretrain_overrides(tmp_path / "r", [str(prefix)] * 2))


def test_token_ids_beyond_the_tokenizer_are_a_clear_error(tmp_path, corpora):
    from megatron_danube.data.indexed import IndexedWriter

    prefix = str(tmp_path / "foreign_text_document")
    with IndexedWriter(prefix, 65000) as w:
        for _ in range(200):
            w.add_document(list(np.random.default_rng(0).integers(30000, 40000, 300)) + [2])
    proc = run_pretrain(tmp_path / "r", [prefix, prefix], **ONE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the corpus was tokenized with another tokenizer" in proc.stderr


@pytest.mark.parametrize("obstacle", ["run_dir_is_file", "checkpoints_is_file", "read_only"])
def test_run_dir_that_cannot_be_written(tmp_path, corpora, obstacle):
    run_dir = tmp_path / "r"
    if obstacle == "run_dir_is_file":
        run_dir.write_text("x")
    elif obstacle == "checkpoints_is_file":
        run_dir.mkdir()
        (run_dir / "checkpoints").write_text("x")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
        run_dir = parent / "r"
        if os.access(parent, os.W_OK):  # root ignores permission bits
            pytest.skip("running as a user that can write anywhere")
    line = plan_error(*pretrain_overrides(run_dir, corpora))
    assert "run_dir" in line or "checkpoints" in line
    assert not (tmp_path / "r").is_dir() or obstacle == "checkpoints_is_file"  # nothing made


def _finished_run(tmp_path, corpora, *extra):
    run_dir = tmp_path / "r"
    run_pretrain(run_dir, corpora, "train.exit_after_steps=2", *extra, nproc=1)
    return run_dir


def test_resume_refuses_a_changed_schedule_unless_allowed(tmp_path, corpora):
    run_dir = _finished_run(tmp_path, corpora)
    proc = run_pretrain(
        run_dir, corpora, "train.global_batch_tokens=512", "train.train_tokens=4096", **ONE
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "train.global_batch_tokens=256 but this run has 512" in proc.stderr
    assert "checkpoint.allow_changes" in proc.stderr
    ok = run_pretrain(
        run_dir,
        corpora,
        "train.train_tokens=4096",
        "train.exit_after_steps=1",
        "checkpoint.allow_changes=[train.train_tokens]",
        nproc=1,
    )
    assert "resumed from" in ok.stdout


def test_resume_refuses_a_changed_model_naming_the_field(tmp_path, corpora):
    run_dir = _finished_run(tmp_path, corpora)
    proc = run_pretrain(run_dir, corpora, "model.overrides.hidden_size=128", **ONE)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "model.hidden_size=64 but this run has 128" in proc.stderr
    assert "stopped at iteration" not in proc.stdout + proc.stderr  # it never started


def test_corrupt_train_state_falls_back_to_an_older_checkpoint(tmp_path, corpora):
    run_dir = _finished_run(tmp_path, corpora, "checkpoint.save_interval=1")
    ckpts = run_dir / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    (ckpts / latest / "train_state.json").write_text("{not json")
    proc = run_pretrain(run_dir, corpora, "train.exit_after_steps=1", nproc=1)
    assert "iter_0000002 is damaged" in proc.stdout and "train_state.json" in proc.stdout
    assert "resumed from" in proc.stdout and "iteration 1," in proc.stdout


def test_a_second_run_in_the_same_run_dir_is_refused_and_a_dead_holder_is_not(tmp_path, corpora):
    run_dir = tmp_path / "r"
    first = run_pretrain(run_dir, corpora, "train.train_tokens=25600", nproc=1, background=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), 300, "the first run")
    second = run_pretrain(run_dir, corpora, **ONE)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGKILL)  # the holder dies without unlocking
    first.wait()
    third = run_pretrain(run_dir, corpora, "train.exit_after_steps=1", nproc=1)
    assert third.returncode == 0


def test_a_changed_dataset_rebuilds_its_indices(tmp_path, corpora):
    from megatron_danube.data.datasets import dataset_fingerprint
    from megatron_danube.data.indexed import IndexedWriter

    prefix = str(tmp_path / "data_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(corpora[0] + ext, prefix + ext)
    before = dataset_fingerprint([prefix])
    run_dir = _finished_run(tmp_path, [prefix, prefix])
    with IndexedWriter(prefix, 32000, overwrite=True) as w:  # re-made under the same prefix
        for i in range(50):
            w.add_document(list(range(100 + i, 400 + i)) + [2])
    assert dataset_fingerprint([prefix]) != before
    proc = run_pretrain(run_dir, [prefix, prefix], "train.exit_after_steps=1", nproc=1)
    assert proc.returncode == 0
    caches = os.listdir(run_dir / "data_cache")
    assert len(caches) == 2 and before in caches


def test_convert_refuses_a_file_or_read_only_save(tmp_path, corpora):
    run_dir = _finished_run(tmp_path, corpora)
    target = tmp_path / "file"
    target.write_text("precious")
    args = ["--to", "hf", "--load", run_dir, "--save", target]
    proc = launch("megatron_danube.cli.convert", *args)
    assert proc.returncode == 2 and "is a file" in proc.stderr and target.read_text() == "precious"
    assert len(proc.stderr.strip().splitlines()) == 1


def test_metrics_hold_each_iteration_once_after_resumes(tmp_path, corpora):
    run_dir = tmp_path / "r"
    for _ in range(3):
        run_pretrain(
            run_dir, corpora, "train.exit_after_steps=2", "checkpoint.save_interval=1", nproc=1
        )
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in records if "loss" in r]
    assert iterations == sorted(set(iterations)) and len(iterations) == 6
