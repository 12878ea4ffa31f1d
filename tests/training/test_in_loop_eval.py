"""lm-eval tasks scored during training: logged at the interval and at the end, the same after
a resume, checked before training starts, and a failing evaluation never costs the run."""

import json
import os

import pytest

from tests.launch import launch, run_pretrain
from tests.training.conftest import train_losses

TASKS = "eval.tasks=[danube_demo_mc,danube_demo_ppl]"
SCORING = (TASKS, "eval.interval=4", "eval.limit=8", "eval.batch_size=4")
BROKEN_YAML = """\
task: danube_test_broken
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
process_results: !function broken.process_results
metric_list:
  - metric: acc
"""
BROKEN_PY = """\
def process_results(doc, results):
    raise RuntimeError("this task's scoring is broken on purpose")
"""


def task_records(run_dir):
    """{iteration: {eval/...: value}} from metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            scores = {k: v for k, v in record.items() if k.startswith("eval/")}
            if scores:
                out[record["iteration"]] = scores
    return out


@pytest.mark.slow  # three 2-rank training launches
def test_tasks_are_scored_at_the_interval_and_resume_exactly(tmp_path, corpora):
    full, split = tmp_path / "full", tmp_path / "split"
    run_pretrain(full, corpora, *SCORING)
    run_pretrain(split, corpora, *SCORING, "train.exit_after_steps=4")
    run_pretrain(split, corpora, *SCORING)
    scores = task_records(full)
    assert sorted(scores) == [4, 8]  # the interval, and the end (step 8) once
    for it in (4, 8):
        assert 0 <= scores[it]["eval/danube_demo_mc/acc"] <= 1
        assert "eval/danube_demo_mc/acc_norm" in scores[it]
        assert scores[it]["eval/danube_demo_ppl/word_perplexity"] > 1
    assert scores[4] != scores[8]  # the model learnt in between
    assert task_records(split) == scores
    assert train_losses(split) == train_losses(full)  # bitwise: scoring changes no step


@pytest.mark.slow  # one 2-rank training launch
def test_a_failing_evaluation_leaves_the_run_and_its_checkpoint(tmp_path, corpora):
    from megatron_danube.eval.demo_tasks import write_demo_tasks

    tasks = tmp_path / "tasks"
    data = os.path.join(write_demo_tasks(str(tasks)), "danube_demo_mc.jsonl")
    (tasks / "danube_test_broken.yaml").write_text(BROKEN_YAML.format(data=data))
    (tasks / "broken.py").write_text(BROKEN_PY)
    run_dir = tmp_path / "run"
    proc = run_pretrain(
        run_dir,
        corpora,
        "eval.tasks=[danube_test_broken]",
        f"eval.include_paths=[{tasks}]",
        "eval.interval=4",
        "eval.limit=4",
    )
    output = proc.stdout + proc.stderr
    assert output.count("task evaluation at iteration 4 failed, training goes on") == 2  # ranks
    assert "task evaluation at iteration 8 failed" in output
    assert "broken on purpose" in output
    assert sorted(train_losses(run_dir)) == list(range(1, 9))
    assert open(run_dir / "checkpoints" / "latest").read().strip() == "iter_0000008"
    assert not task_records(run_dir)


@pytest.mark.slow  # one launch, refused in its preflight (~15 s: lm-eval indexes its tasks)
def test_unknown_task_is_refused_before_training(tmp_path, corpora):
    proc = launch(
        "megatron_danube.pretrain",
        "--config",
        "tests/training/tiny_run.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.blend=[{corpora[0]}]",
        "eval.tasks=[danube_demo_mcq]",
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("danube-pretrain: error: unknown task 'danube_demo_mcq'; tasks")
    assert not (tmp_path / "run").exists()
