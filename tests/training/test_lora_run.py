"""LoRA fine-tuning end to end on the CPU: SFT from an HF model with adapters only, exact
resume, the base untouched, and both exports (merged, PEFT adapter) read by HF PEFT."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.launch import launch, run_finetune
from tests.training.conftest import hf_model

pytestmark = pytest.mark.slow

LORA = ["peft.method=lora", "peft.rank=4", "peft.alpha=16", "optim.lr=0.02"]
LORA += ["optim.warmup_tokens=512"]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f) if "val_loss" not in r}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_danube.data.demo_chat import conversations

    root = tmp_path_factory.mktemp("lora")
    train, _ = conversations()
    data = root / "train8.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train[:8]))
    start = hf_model(root / "start", seed=0)
    args = [f"chat.train=[{data}]", f"checkpoint.load={start}", "chat.epochs=12", *LORA]
    return root, start, args


@pytest.fixture(scope="module")
def lora_run(setup):
    root, _, args = setup
    run_dir = root / "whole"
    run_finetune(run_dir, *args, config="tests/training/tiny_sft.yaml")
    return str(run_dir)


def test_only_adapters_train_and_the_loss_falls(lora_run):
    log = losses(lora_run)
    assert log[max(log)] < log[1] - 0.5, log
    state_file = os.path.join(lora_run, "checkpoints")
    latest = open(os.path.join(state_file, "latest")).read().strip()
    state = json.load(open(os.path.join(state_file, latest, "train_state.json")))
    assert state["lora"]["rank"] == 4 and state["lora"]["alpha"] == 16


def test_resume_is_exact(setup, lora_run):
    root, _, args = setup
    split = root / "split"
    run_finetune(split, *args, "train.exit_after_steps=3", config="tests/training/tiny_sft.yaml")
    run_finetune(split, *args, config="tests/training/tiny_sft.yaml")
    assert losses(str(split)) == losses(lora_run)


def test_checkpoints_hold_the_adapters_only_and_name_their_base(lora_run):
    """No base tensor in the run's checkpoints; the base is named by its manifest's hash."""
    code = (
        "import sys, os\n"
        "from megatron_danube.convert.checkpoint_io import load_megatron_weights, read_state\n"
        "from megatron_danube.convert.checkpoint_io import model_config_of, resolve_checkpoint\n"
        "from megatron_danube.models.lora import is_adapter_name\n"
        "from megatron_danube.training.lora_checkpoints import manifest_hash\n"
        "ckpt = resolve_checkpoint(sys.argv[1])\n"
        "state = read_state(ckpt)\n"
        "stored = load_megatron_weights(ckpt, model_config_of(state), with_base=False)\n"
        "assert stored and all(is_adapter_name(k) for k in stored), sorted(stored)[:3]\n"
        "base = state['lora']['base_checkpoint']\n"
        "assert state['lora']['base_manifest'] == manifest_hash(base)\n"
        "size = lambda d: sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) "
        "for f in fs)\n"
        "print('sizes', size(ckpt), size(base), len(stored))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code, lora_run],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "sizes" in proc.stdout, proc.stderr[-3000:]
    _, run_bytes, base_bytes, tensors = proc.stdout.split()
    assert int(tensors) == 2 * 7 * 4  # A and B of seven projections, four layers
    assert int(run_bytes) < int(base_bytes) / 4


@pytest.fixture(scope="module")
def two_bases(setup):
    """Two megatron checkpoints of different random models (danube-convert --to mcore)."""
    root, start, _ = setup
    other = hf_model(root / "other_hf", seed=1)
    out = []
    for name, hf in (("base_a", start), ("base_b", other)):
        args = ["--to", "mcore", "--load", hf, "--save", root / name, "--dtype", "float32"]
        launch("megatron_danube.cli.convert", *args, check=True)
        out.append(root / name)
    return out


def test_resuming_on_another_base_is_refused_and_keeps_the_checkpoints(setup, two_bases):
    import shutil

    root, _, args = setup
    base_a, base_b = two_bases
    moving = root / "moving_base"
    shutil.copytree(base_a, moving)
    run_dir = root / "on_moving_base"
    args = [a for a in args if not a.startswith("checkpoint.load=")]
    run = ["train.exit_after_steps=2", f"checkpoint.load={moving}", *args]
    run_finetune(run_dir, *run, config="tests/training/tiny_sft.yaml")
    before = sorted(os.listdir(run_dir / "checkpoints"))
    shutil.rmtree(moving)
    shutil.copytree(base_b, moving)  # another model where the base was
    proc = run_finetune(run_dir, *run, config="tests/training/tiny_sft.yaml", nproc=1, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is another model (manifest" in lines[0], lines[-3:]
    assert "set checkpoint.load" in lines[0]
    # The base back in place but other adapters asked for: refused before any tensor is read.
    shutil.rmtree(moving)
    shutil.copytree(base_a, moving)
    proc = run_finetune(
        run_dir, *run, "peft.rank=8", config="tests/training/tiny_sft.yaml", nproc=1, check=False
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "holds adapters with" in lines[-1], lines[-3:]
    assert sorted(os.listdir(run_dir / "checkpoints")) == before
    assert sorted(os.listdir(run_dir / "checkpoints")) == before
    # As it was: the run goes on.
    run_finetune(run_dir, *run, config="tests/training/tiny_sft.yaml")
    assert len(losses(str(run_dir))) == 4


def test_exports_merged_and_as_a_peft_adapter_agree(setup, lora_run, two_bases, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, start, _ = setup
    plain = launch(
        "megatron_danube.cli.convert",
        "--to",
        "hf",
        "--load",
        lora_run,
        "--save",
        tmp_path / "plain",
    )
    assert plain.returncode == 2 and "add --merge-lora" in plain.stderr
    assert not (tmp_path / "plain").exists()
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    args = ["--load", lora_run, "--dtype", "float32"]
    launch(
        "megatron_danube.cli.convert",
        "--to",
        "hf",
        "--merge-lora",
        *args,
        "--save",
        merged,
        check=True,
    )
    launch("megatron_danube.cli.convert", "--to", "hf-peft", *args, "--save", adapter, check=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == start
    ids = torch.randint(0, 32000, (2, 40), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(adapter))(input_ids=ids).logits
        one_model = AutoModelForCausalLM.from_pretrained(str(merged))(input_ids=ids).logits
    assert (with_adapter - one_model).abs().max() < 1e-4
    assert (with_adapter - before).abs().max() > 1e-2  # the adapters learnt something
    # danube-compare runs the LoRA model as it trained (base + adapters) against the merge.
    compared = launch(
        "megatron_danube.cli.compare", "--hf", merged, "--mcore", lora_run, check=True
    ).stdout
    diff = float(compared.split("max_abs_logit_diff:")[1].split()[0])
    assert diff < 1e-4, compared
    # A merge on another base than the adapters were trained on is refused.
    wrong = launch(
        "megatron_danube.cli.convert",
        "--to",
        "hf",
        "--merge-lora",
        *args,
        "--lora-base",
        two_bases[1],
        "--save",
        tmp_path / "wrong",
    )
    assert wrong.returncode == 2 and "is another model (manifest" in wrong.stderr
    assert not (tmp_path / "wrong").exists()


def test_a_lora_run_is_evaluated_as_it_trained(lora_run, tmp_path):
    """danube-eval on the LoRA run (base + adapters, TP=2) scores as lm-eval's hf model on the
    merged export: same choices, same log-likelihoods within 1e-4."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron_danube.eval.demo_tasks import MC_TASK, write_demo_tasks

    tasks = write_demo_tasks(str(tmp_path / "tasks"))
    merged = tmp_path / "merged"
    args = ["--to", "hf", "--merge-lora", "--load", lora_run, "--dtype", "float32"]
    launch("megatron_danube.cli.convert", *args, "--save", merged, check=True)
    output = tmp_path / "results.json"
    launch(
        "megatron_danube.eval",
        *["--load", lora_run, "--tasks", MC_TASK, "--include-path", tasks, "--limit", 8],
        *["--bootstrap-iters", 0, "--output", output, "--log-samples"],
        *["parallel.tensor_parallel=2", "model.spec=local", "train.device=cpu"],
        nproc=2,
        check=True,
        timeout=900,
    )
    ours = json.loads(output.read_text())
    reference = simple_evaluate(
        model="hf",
        model_args=f"pretrained={merged},dtype=float32",
        device="cpu",
        batch_size=4,
        tasks=[MC_TASK],
        limit=8,
        task_manager=TaskManager(include_path=tasks),
        bootstrap_iters=0,
        log_samples=True,
    )
    assert ours["results"][MC_TASK]["acc,none"] == reference["results"][MC_TASK]["acc,none"]
    mine = {s["doc_id"]: s["resps"] for s in ours["samples"][MC_TASK]}
    theirs = {s["doc_id"]: s["resps"] for s in reference["samples"][MC_TASK]}
    assert sorted(mine) == sorted(theirs) and len(mine) == 8
    for doc, expected in theirs.items():
        for got, ref in zip(mine[doc], expected):
            assert abs(float(got[0][0]) - float(ref[0][0])) < 1e-4, (doc, got, ref)
