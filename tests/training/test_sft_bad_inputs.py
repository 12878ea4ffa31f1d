"""Chat jobs' bad input: one line naming the problem and the fix, before any model is built
(the preflight in this process; the command line once)."""

import json
import os

import pytest

from megatron_danube.errors import DanubeConfigError
from tests.conftest import REPO
from tests.launch import launch
from tests.training.conftest import plan_error
from tests.training.test_bad_inputs import _error_line

pytestmark = pytest.mark.slow

CONFIG = os.path.join(REPO, "tests/training/tiny_sft.yaml")


def run(module, *overrides, config=CONFIG):
    return launch(module, "--config", config, *overrides, timeout=300)


@pytest.fixture
def chat(tmp_path):
    path = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path.write_text(json.dumps(record) + "\n")
    start = tmp_path / "start"
    start.mkdir()  # a checkpoint by its train state; never loaded (the errors come first)
    (start / "train_state.json").write_text(json.dumps({"iteration": 1}))
    return [f"chat.train=[{path}]", f"checkpoint.load={start}", f"run_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize(
    "change,expected",
    [
        (["chat.train=[]"], "job: sft needs chat.train"),
        (
            ["chat.train=[/nonexistent/chat.jsonl]"],
            "chat.train: /nonexistent/chat.jsonl does not exist; give JSONL files",
        ),
        (["checkpoint.load=null"], "set checkpoint.load to a run directory"),
        (["checkpoint.load=/"], "checkpoint.load /: not a megatron_danube checkpoint"),
        (["train.global_batch_tokens=300"], "must be chat.seq_length (256) x a multiple"),
        (["chat.template='{% for m in %}'"], "chat template does not compile"),
        (["chat.seq_length=100000"], "exceeds model danube-tiny's context 512"),
        (["chat.truncation=middle"], "chat.truncation"),
        (["parallel.context_parallel=2"], "set parallel.context_parallel=1"),
        (["stages=[{seq_length: 64}, {start_tokens: 512, seq_length: 128}]"], "remove stages"),
    ],
)
def test_sft_config_errors(chat, change, expected):
    assert expected in plan_error(*chat, *change, config=CONFIG)


def test_a_config_error_on_the_command_line_is_one_line_and_exit_2(chat):
    line = _error_line(run("megatron_danube.finetune", *chat, "chat.train=[]"))
    assert line.startswith("danube-finetune: error: job: sft needs chat.train")


@pytest.mark.parametrize(
    "family,job,expected",
    [("finetune", "pretrain", "not a fine-tuning job"), ("pretrain", "sft", "danube-finetune")],
)
def test_pretrain_config_is_refused_by_finetune_and_the_reverse(family, job, expected):
    from megatron_danube.cli.train import refuse_other_family

    with pytest.raises(DanubeConfigError, match=expected):
        refuse_other_family(job, family)
    refuse_other_family(job, None)  # danube-train runs every job


@pytest.mark.parametrize("key", ["chat.train", "chat.valid"])
def test_data_without_one_usable_record(chat, tmp_path, key):
    """Training or validation files without one usable row are an error, not a skipped
    validation."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "no answer"}]}\n{oops\n')
    proc = run("megatron_danube.finetune", *chat, f"{key}=[{bad}]", "logging.eval_at_start=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{key} has no usable sample" in proc.stderr
    assert f"{bad}:1: no assistant message" in proc.stderr  # the error names file:line
    assert f"{bad}:2: malformed JSON" in proc.stderr
