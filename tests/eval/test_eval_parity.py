"""The `danube` lm-eval model against lm-eval's `hf` model on the HF export of the same random
danube-tiny: multiple choice, rolling perplexity and greedy generation give the same answers at
TP=1, TP=2 x PP=2 and DP=2 (fp32, gloo, CPU). TP=2 alone is not a case of its own: TP=2 x PP=2
has its tensor-parallel split and its pipeline on top."""

import json

import pytest

from tests.eval.conftest import GENERATION_TASK
from tests.launch import launch

MC, PPL = "danube_demo_mc", "danube_demo_ppl"
TASKS = [MC, PPL, GENERATION_TASK]
LIMIT = 12  # documents per task: 48 choices, 12 paragraphs, 12 generations
LAYOUTS = {
    "tp1": (1, []),
    "tp2xpp2": (4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]),
    "dp2": (2, []),
}


def responses(samples):
    """{doc_id: the document's responses}, what each request returned."""
    return {s["doc_id"]: s["resps"] for s in samples}


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoint, task_dir):
    """lm-eval's own `hf` model on the export, in this process."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, hf = tiny_checkpoint
    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf},dtype=float32",
        device="cpu",
        batch_size=4,
        tasks=TASKS,
        limit=LIMIT,
        task_manager=TaskManager(include_path=task_dir),
        bootstrap_iters=0,
        log_samples=True,
    )
    return out


@pytest.mark.slow  # launches 1 to 4 processes for ~1 minute each
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_danube_model_answers_as_the_hf_model(
    layout, tiny_checkpoint, task_dir, hf_reference, tmp_path
):
    mcore, _ = tiny_checkpoint
    nproc, overrides = LAYOUTS[layout]
    output = tmp_path / "results.json"
    args = ["--load", mcore, "--tokenizer", "mistral-v1", "--tasks", ",".join(TASKS)]
    args += ["--include-path", task_dir, "--limit", LIMIT, "--batch-size", 3]
    args += ["--bootstrap-iters", 0, "--output", output, "--log-samples", "train.device=cpu"]
    launch("megatron_danube.eval", *args, *overrides, nproc=nproc, check=True, timeout=900)
    ours = json.loads(output.read_text())
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"][MC][metric] == hf_reference["results"][MC][metric], metric
    for task in TASKS:
        mine, theirs = (responses(s[task]) for s in (ours["samples"], hf_reference["samples"]))
        assert sorted(mine) == sorted(theirs) and len(mine) == LIMIT
        for doc_id, expected in theirs.items():
            got = mine[doc_id]
            if task == GENERATION_TASK:
                assert got == expected, (doc_id, got, expected)
                continue
            for (ours_ll, *ours_greedy), (ref_ll, *ref_greedy) in zip(
                [r[0] if isinstance(r[0], list) else r for r in got],
                [r[0] if isinstance(r[0], (list, tuple)) else r for r in expected],
            ):
                # 1e-4, plus two float32 steps of a large sum (HF sums a paragraph in float32)
                tolerance = 1e-4 + 2.5e-7 * abs(float(ref_ll))
                difference = abs(float(ours_ll) - float(ref_ll))
                assert difference < tolerance, (task, doc_id, got, expected)
                assert [bool(g) for g in ours_greedy] == [bool(g) for g in ref_greedy]


@pytest.mark.slow  # needs the converted checkpoint
def test_a_layout_that_does_not_fit_is_one_line(tiny_checkpoint, task_dir):
    mcore, _ = tiny_checkpoint
    args = ["--load", mcore, "--tokenizer", "mistral-v1", "--tasks", MC]
    args += ["--include-path", task_dir, "parallel.tensor_parallel=3"]
    proc = launch("megatron_danube.eval", *args)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("danube-eval: error: "), err
    assert "tensor_parallel" in err[0] or "TP" in err[0], err[0]
