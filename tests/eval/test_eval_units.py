"""The evaluation's parts in this process: exact log-probabilities over the true vocabulary,
the demo tasks, the metric names training logs, and bad input refused in one line."""

import json
import os

import pytest
import torch

from megatron_danube.eval.demo_tasks import (
    CONTINUATION_WORDS,
    MC_ITEMS,
    multiple_choice_items,
    write_demo_tasks,
)
from megatron_danube.eval.results import flat_metrics
from megatron_danube.eval.scoring import vocab_parallel_logprob_and_argmax


def test_log_probabilities_leave_the_padded_vocabulary_out(single_rank):
    torch.manual_seed(0)
    vocab, padded = 250, 256
    logits = torch.randn(2, 5, padded)
    logits[..., vocab:] = 50.0  # padding rows that would win every argmax were they counted
    targets = torch.randint(0, vocab, (2, 5))
    logprob, argmax = vocab_parallel_logprob_and_argmax(logits, targets, vocab)
    expected = torch.log_softmax(logits[..., :vocab], -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(logprob, expected, atol=1e-6)
    assert torch.equal(argmax, logits[..., :vocab].argmax(-1))


def test_demo_items_are_deterministic_with_one_true_continuation():
    from megatron_danube.data.demo_corpus import pydoc_paragraphs

    items = multiple_choice_items()
    assert items == multiple_choice_items() and len(items) == MC_ITEMS
    text = {" ".join(p.split()) for p in pydoc_paragraphs()}
    labels = [item["label"] for item in items]
    assert {0, 1, 2, 3} == set(labels)  # the answer's position varies
    for item in items[:50]:
        choices = item["choices"]
        assert len(set(choices)) == 4
        assert all(len(c.split()) == CONTINUATION_WORDS for c in choices)
        true = f"{item['passage']} {choices[item['label']]}"
        assert any(t.startswith(true) for t in text)
        for k, other in enumerate(choices):
            if k != item["label"]:
                assert not any(t.startswith(f"{item['passage']} {other}") for t in text)


def test_demo_tasks_are_written_once_and_name_their_data(tmp_path):
    folder = write_demo_tasks(str(tmp_path / "tasks"))
    yaml_text = open(os.path.join(folder, "danube_demo_mc.yaml")).read()
    assert os.path.join(folder, "danube_demo_mc.jsonl") in yaml_text
    rows = [json.loads(line) for line in open(os.path.join(folder, "danube_demo_ppl.jsonl"))]
    assert len(rows) == 40 and all(len(r["text"]) >= 200 for r in rows)
    before = os.stat(os.path.join(folder, "danube_demo_mc.jsonl")).st_mtime_ns
    write_demo_tasks(folder)
    assert os.stat(os.path.join(folder, "danube_demo_mc.jsonl")).st_mtime_ns == before


def test_training_logs_eval_task_metric_names():
    results = {
        "results": {
            "hellaswag": {"alias": "hellaswag", "acc,none": 0.5, "acc_stderr,none": 0.01},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.3},
        }
    }
    assert flat_metrics(results) == {
        "eval/hellaswag/acc": 0.5,
        "eval/gsm8k/exact_match/strict-match": 0.25,
        "eval/gsm8k/exact_match/flexible-extract": 0.3,
    }


@pytest.fixture(scope="module")
def missing_data_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gone")
    text = open(os.path.join(write_demo_tasks(str(folder)), "danube_demo_mc.yaml")).read()
    text = text.replace("danube_demo_mc", "danube_test_gone").replace(".jsonl", "-missing.jsonl")
    (folder / "gone.yaml").write_text(text)
    return folder


def test_a_missing_checkpoint_is_one_line_before_the_task_index(tmp_path):
    """Checked before lm-eval indexes its thousands of task files (about 15 s)."""
    from tests.launch import launch

    args = ["--tasks", "danube_demo_mc", "--load", "/no/such/run", "--demo-tasks", tmp_path]
    proc = launch("megatron_danube.eval", *args)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("danube-eval: error: "), err
    assert "--load /no/such/run: no such" in err[0], err[0]


@pytest.mark.slow  # lm-eval indexes its thousands of task files (~15 s)
def test_unknown_tasks_and_tasks_without_data_are_one_line(missing_data_tasks):
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.eval.tasks import load_tasks, task_manager

    manager = task_manager([str(missing_data_tasks)])
    cases = {"no_such_task": "unknown task 'no_such_task'", "danube_test_gone": "its data"}
    for name, line in cases.items():
        with pytest.raises(DanubeConfigError) as refused:
            load_tasks([name], manager)
        assert "\n" not in str(refused.value) and line in str(refused.value), refused.value
