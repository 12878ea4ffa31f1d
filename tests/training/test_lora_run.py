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
from tests.training.test_dpo import hf_model

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


def test_the_base_weights_are_bit_identical_after_training(lora_run):
    """The run's checkpoint holds the start's weights untouched next to the adapters."""
    start = [d for d in os.listdir(lora_run) if d.startswith("base_from_hf-")][0]
    code = (
        "import sys, torch\n"
        "from megatron_danube.convert.checkpoint_io import load_megatron_weights, read_state\n"
        "from megatron_danube.convert.checkpoint_io import model_config_of, resolve_checkpoint\n"
        "from megatron_danube.models.lora import is_adapter_name\n"
        "a, b = (resolve_checkpoint(p) for p in sys.argv[1:3])\n"
        "cfg = model_config_of(read_state(a))\n"
        "wa, wb = load_megatron_weights(a, cfg), load_megatron_weights(b, cfg)\n"
        "base = [k for k in wa if not is_adapter_name(k)]\n"
        "assert set(base) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in base)\n"
        "assert sum(is_adapter_name(k) for k in wa) > 0\n"
        "print('identical', len(base))\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-c", code, lora_run, os.path.join(lora_run, start)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "identical" in proc.stdout, proc.stderr[-3000:]


def test_exports_merged_and_as_a_peft_adapter_agree(setup, lora_run, tmp_path):
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
