"""DPO with LoRA against TRL's DPOTrainer with PEFT, from an HF PEFT adapter whose B is not zero
(so the policy starts away from the base and both references are tested):

* `dpo.reference: adapters_off` against TRL given a `peft_config` (reference: adapters off),
  at one rank and at TP=2 x PP=2;
* `dpo.reference: precomputed` against TRL given the loaded `PeftModel` (reference: a frozen
  copy of the starting adapter).
"""

import math
import os

import pytest

from tests.training.test_dpo import assert_steps_match, finetune, metrics, run_trl

pytestmark = pytest.mark.slow

RANK, ALPHA = 4, 16
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, start):
    """A PEFT adapter on the start model with A and B random (B small, as after training)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=PROJECTIONS, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(str(path))
    return str(path)


def trl_log(tmp_path_factory, start, pairs, adapter, how):
    return run_trl(tmp_path_factory.mktemp("trl") / f"{how}.json", start, pairs, adapter, how)


@pytest.fixture(scope="module")
def trl_adapters_off(tmp_path_factory, start, pairs, adapter):
    return trl_log(tmp_path_factory, start, pairs, adapter, "peft_config")


def lora_args(pairs, adapter, reference):
    return [
        f"chat.train=[{pairs}]",
        f"checkpoint.load={adapter}",
        "peft.method=lora",
        f"peft.rank={RANK}",
        f"peft.alpha={ALPHA}",
        f"dpo.reference={reference}",
    ]


def test_adapters_off_reference_matches_trl_with_a_peft_config(
    tmp_path,
    pairs,
    adapter,
    trl_adapters_off,
):
    run_dir = tmp_path / "tp1"
    finetune(run_dir, *lora_args(pairs, adapter, "adapters_off"))
    records = metrics(str(run_dir))
    assert_steps_match(records, trl_adapters_off)
    # The starting adapter moves the policy off the base: the first loss is not log 2.
    assert abs(records[0]["loss"] - math.log(2)) > 1e-3
    assert not os.path.exists(run_dir / "reference_logps.npz")


def test_adapters_off_reference_matches_trl_at_tp2_pp2(
    tmp_path,
    pairs,
    adapter,
    trl_adapters_off,
):
    run_dir = tmp_path / "tp2pp2"
    layout = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]
    finetune(run_dir, *lora_args(pairs, adapter, "adapters_off"), *layout, nproc=4)
    assert_steps_match(metrics(str(run_dir)), trl_adapters_off)


def test_precomputed_reference_matches_trl_with_the_adapter_as_reference(
    tmp_path,
    tmp_path_factory,
    start,
    pairs,
    adapter,
):
    log = trl_log(tmp_path_factory, start, pairs, adapter, "peft_model")
    run_dir = tmp_path / "precomputed"
    finetune(run_dir, *lora_args(pairs, adapter, "precomputed"))
    records = metrics(str(run_dir))
    assert_steps_match(records, log)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference
