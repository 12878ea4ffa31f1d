"""danube-finetune end to end on the CPU: from an HF model directory, overfit 8 conversations,
resume exactly, export with the chat template, and chat through `transformers`."""

import json
import os

import pytest

from tests.conftest import REPO
from tests.launch import DANUBE_LAUNCH, launch, run_finetune
from tests.training.conftest import plan_error

pytestmark = pytest.mark.slow

PRESET = "danube-tiny"


def finetune(run_dir, *overrides, nproc=2, check=True):
    return run_finetune(
        run_dir, *overrides, config="tests/training/tiny_sft.yaml", nproc=nproc, check=check
    )


def records(run_dir, key):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if key in r]


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """8 training conversations from the pydoc chat demo (multi-turn and system prompts)."""
    from megatron_danube.data.demo_chat import conversations

    train, _ = conversations()
    root = tmp_path_factory.mktemp("chat")
    path = root / "train8.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train[:8]))
    return str(path), train[:8]


@pytest.fixture(scope="module")
def hf_start(tmp_path_factory):
    """A random danube-tiny as an HF MistralForCausalLM directory with the mistral-v1 tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_danube.data.hf_tokenizer import save_hf_tokenizer
    from megatron_danube.data.tokenizer import load_tokenizer
    from megatron_danube.models.hf_adapter import hf_config_dict
    from megatron_danube.models.presets import get_preset

    out = tmp_path_factory.mktemp("hf_start")
    torch.manual_seed(0)
    config = MistralConfig(**hf_config_dict(get_preset(PRESET), "float32"))
    MistralForCausalLM(config).save_pretrained(str(out))
    save_hf_tokenizer(load_tokenizer("mistral-v1"), str(out))
    return str(out)


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, chat_files, hf_start):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    path, _ = chat_files
    finetune(run_dir, f"chat.train=[{path}]", f"chat.valid=[{path}]", f"checkpoint.load={hf_start}")
    return str(run_dir)


def test_overfits_eight_conversations_to_near_zero_masked_loss(overfit_run):
    valid = records(overfit_run, "val_loss")
    assert valid[0]["val_loss"] > 5.0  # eval_at_start: the random model
    assert valid[-1]["val_loss"] < 0.05, valid[-1]
    assert valid[-1]["val_supervised_tokens"] == valid[0]["val_supervised_tokens"]
    converted = [d for d in os.listdir(overfit_run) if d.startswith("base_from_hf-")]
    assert len(converted) == 1  # the HF start, converted once


def test_resume_reads_what_an_uninterrupted_run_reads(overfit_run, tmp_path, chat_files, hf_start):
    path, _ = chat_files
    run_dir = tmp_path / "resumed"
    args = [f"chat.train=[{path}]", f"chat.valid=[{path}]", f"checkpoint.load={hf_start}"]
    finetune(run_dir, *args, "train.exit_after_steps=7")
    assert records(str(run_dir), "loss")[-1]["iteration"] == 7
    # Five steps more cross several epochs' reshuffles (about 1.5 steps per epoch): what the
    # whole run read at steps 8-12 is what the resumed one reads.
    finetune(run_dir, *args, "train.exit_after_steps=5")
    whole = {r["iteration"]: r["loss"] for r in records(overfit_run, "loss") if "val_loss" not in r}
    resumed = {
        r["iteration"]: r["loss"] for r in records(str(run_dir), "loss") if "val_loss" not in r
    }
    assert sorted(resumed) == list(range(1, 13))
    assert resumed == {i: whole[i] for i in resumed}


def test_export_chats_with_the_template_and_stops_at_eos(overfit_run, tmp_path, chat_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_danube.data.chat.template import DANUBE_TEMPLATE

    out = tmp_path / "hf"
    args = ["--to", "hf", "--dtype", "float32", "--load", overfit_run, "--save", out]
    launch("megatron_danube.cli.convert", *args, check=True)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DANUBE_TEMPLATE and config["eos_token"] == "</s>"
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    _, conversations = chat_files
    messages = conversations[1]["messages"]
    turn = [i for i, m in enumerate(messages) if m["role"] == "assistant"][0]
    ids = tok.apply_chat_template(
        messages[:turn], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    assert ids[0, 0].item() != tok.bos_token_id  # the Danube template has no BOS
    generated = model.generate(ids, max_new_tokens=120, do_sample=False)[0, ids.shape[1] :]
    assert generated[-1].item() == tok.eos_token_id and len(generated) < 120  # stopped at </s>
    assert tok.decode(generated, skip_special_tokens=True) == messages[turn]["content"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("{% for m in messages %}", "does not compile"),
        ("{% for m in messages %}{{ m.content + nothing.here }}{% endfor %}", "probe conversation"),
    ],
)
def test_export_refuses_a_template_file_that_fails_before_writing(
    overfit_run, tmp_path, capsys, text, expected
):
    from megatron_danube.cli.convert import command

    template = tmp_path / "bad.jinja"
    template.write_text(text)
    out = tmp_path / "hf"
    args = ["--to", "hf", "--load", overfit_run, "--save", str(out)]
    assert command(args + ["--chat-template", str(template)]) == 2
    assert expected in capsys.readouterr().err and not out.exists()


def launch_finetune(run_dir, config, *overrides, nproc=2):
    """danube-launch (a config error: the line once and exit 2) with `nproc` workers."""
    return run_finetune(
        run_dir, *overrides, config=config, nproc=nproc, launcher=DANUBE_LAUNCH, check=False
    )


def refuse_changed_inputs(run, run_dir, cases, preflight):
    """Each case reruns `run_dir` with one input changed: refused naming it, nothing written.
    The first case through a 2-rank launch (exit 2, the line once), the others through
    `preflight(run_dir, *overrides)` in this process (the same check, without the launch)."""
    checkpoints = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    config = open(os.path.join(run_dir, "config.yaml")).read()
    metrics = open(os.path.join(run_dir, "metrics.jsonl")).read()
    for i, (overrides, what) in enumerate(cases):
        if i == 0:
            proc = run(run_dir, *overrides)
            assert proc.returncode == 2, (overrides, proc.stderr[-3000:])
            errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
            assert len(errors) == 1, proc.stderr[-3000:]
        else:
            errors = [preflight(run_dir, *overrides)]
        assert f"holds checkpoints trained on another {what}" in errors[0]
        assert "checkpoint.load=" in errors[0]  # the second way on: a new phase from this run
        assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == checkpoints
        assert open(os.path.join(run_dir, "config.yaml")).read() == config
        assert open(os.path.join(run_dir, "metrics.jsonl")).read() == metrics


def changed_inputs(tmp_path, records, other_tokenizer, data_key):
    """(a data file with one record changed, a template of other text, another tokenizer)."""
    from megatron_danube.data.chat.template import DANUBE_TEMPLATE

    changed = [json.loads(json.dumps(r)) for r in records]
    changed[0] = dict(changed[0], **{data_key: changed[1][data_key]})
    data = tmp_path / "changed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in changed))
    template = tmp_path / "other.jinja"
    template.write_text(DANUBE_TEMPLATE + "{# another revision #}")
    return str(data), str(template), other_tokenizer


def test_resume_with_changed_inputs_is_refused_and_keeps_every_checkpoint(
    overfit_run, tmp_path, chat_files, hf_start, other_tokenizer
):
    import shutil

    path, records = chat_files
    run_dir = str(tmp_path / "run")
    shutil.copytree(overfit_run, run_dir)
    data, template, tokenizer = changed_inputs(tmp_path, records, other_tokenizer, "messages")
    base = [f"chat.valid=[{path}]", f"checkpoint.load={hf_start}"]

    def run(run_dir, *overrides):
        return launch_finetune(run_dir, "tests/training/tiny_sft.yaml", *base, *overrides)

    def preflight(run_dir, *overrides):
        return plan_error(
            f"run_dir={run_dir}", *base, *overrides, config="tests/training/tiny_sft.yaml"
        )

    refuse_changed_inputs(
        run,
        run_dir,
        [
            ([f"chat.train=[{data}]"], "chat.train (the files' contents)"),
            ([f"chat.train=[{path}]", f"chat.template={template}"], "chat.template (its text)"),
            ([f"chat.train=[{path}]", f"data.tokenizer={tokenizer}"], "data.tokenizer"),
        ],
        preflight,
    )
    # One file under another spelling is the same input: the finished run says so, exit 0.
    spelled = os.path.relpath(path, REPO)
    proc = run(run_dir, f"chat.train=[{spelled}]")
    assert proc.returncode == 0 and "this run finished earlier" in proc.stderr + proc.stdout


def test_a_start_from_a_checkpoint_of_another_tokenizer_is_refused(
    overfit_run, tmp_path, chat_files, other_tokenizer
):
    path, _ = chat_files
    proc = launch_finetune(
        tmp_path / "new",
        "tests/training/tiny_sft.yaml",
        f"chat.train=[{path}]",
        f"checkpoint.load={overfit_run}",
        f"data.tokenizer={other_tokenizer}",
    )
    assert proc.returncode == 2
    assert f"checkpoint.load={overfit_run} was trained with another tokenizer" in proc.stderr
    assert not os.path.exists(tmp_path / "new" / "checkpoints")


def test_a_training_rank_encodes_in_worker_processes(tmp_path, hf_start):
    """More conversations than one worker batch: rank 0 of a 2-rank launch encodes them in two
    worker processes (a forked worker of a rank with threads can block forever: this is the
    test of the start method)."""
    from megatron_danube.data.chat.dataset import RECORDS_PER_TASK
    from megatron_danube.data.demo_chat import conversations

    train, _ = conversations()
    data = tmp_path / "many.jsonl"
    lines = [json.dumps(r) for r in train] * 2
    assert len(lines) > RECORDS_PER_TASK
    data.write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "run"
    proc = run_finetune(
        run_dir,
        f"chat.train=[{data}]",
        f"checkpoint.load={hf_start}",
        "chat.workers=2",
        "train.exit_after_steps=1",
        config="tests/training/tiny_sft.yaml",
        nproc=2,
        timeout=300,
    )
    assert f"encoded train: {len(lines)} records" in proc.stderr + proc.stdout
    assert records(str(run_dir), "loss")
