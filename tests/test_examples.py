"""Every example, run at tiny scale on the CPU. The README's demo config
(`danube-tiny-cpu.yaml`) runs in `tests/test_readme_flow.py`, as the README's own command."""

import os
import subprocess

import pytest
import torch

from tests.conftest import REPO
from tests.launch import launch, run_pretrain
from tests.training.conftest import train_losses

pytestmark = pytest.mark.slow  # launches training processes

TINY_MODEL = (
    "model.preset=danube-tiny",
    "model.spec=local",
    "train.device=cpu",
    "precision.params_dtype=float32",
    "checkpoint.async_save=false",
    "logging.eval_interval=0",
    "logging.log_interval=1",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from megatron_danube.data.demo_corpus import ensure_demo_corpus
    from megatron_danube.data.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("corpus") / "pydoc_text_document"
    return ensure_demo_corpus(str(path), load_tokenizer("mistral-v1"))


def _run_example_config(config, tmp_path, corpus, *extra):
    run_dir = tmp_path / os.path.basename(config).replace(".yaml", "")
    # The example's stage schedule, scaled down: lengths /32 (2048 -> 64 ...), 2 steps.
    from megatron_danube.config import load_config

    stages = load_config(config, ["data.blend=[x]"]).stages
    scaled = [f"stages.{i}.seq_length={s.seq_length // 32}" for i, s in enumerate(stages)]
    run_pretrain(
        run_dir,
        [corpus, corpus],
        *TINY_MODEL,
        f"data.blend=[{corpus}]",
        "data.tokenizer=mistral-v1",
        *scaled,
        "train.global_batch_tokens=1024",
        "train.train_tokens=2048",
        "optim.warmup_tokens=1024",
        *extra,
        nproc=1,
        config=config,
    )
    return run_dir


def test_example_danube_1_8b_config_at_tiny_scale(tmp_path, corpus):
    run_dir = _run_example_config(
        "examples/configs/danube-1.8b.yaml",
        tmp_path,
        corpus,
        "stages.1.blend=null",
        "stages.2.blend=null",
        "stages.3.blend=null",
    )
    assert len(train_losses(run_dir)) == 2


def test_example_danube2_config_at_tiny_scale(tmp_path, corpus):
    run_dir = _run_example_config(
        "examples/configs/danube2-1.8b.yaml",
        tmp_path,
        corpus,
        "checkpoint.load=null",
        "stages.1.blend=null",
        "stages.2.blend=null",
    )
    assert len(train_losses(run_dir)) == 2


def test_examples_continue_from_hf_then_convert_to_hf(tmp_path, corpus):
    from transformers import MistralForCausalLM

    from megatron_danube.models.hf_adapter import mistral_config
    from megatron_danube.models.presets import get_preset

    torch.manual_seed(0)
    hf_dir = tmp_path / "released-hf"
    released = MistralForCausalLM(mistral_config(get_preset("danube-tiny")))
    with torch.no_grad():  # a fingerprint: confident logits no fresh init would give
        released.lm_head.weight.mul_(50)
    released.save_pretrained(hf_dir)
    env = dict(os.environ, PYTHONPATH=REPO, NPROC="2", MCORE_DIR=str(tmp_path / "mcore"))
    run_dir = tmp_path / "continued"
    proc = subprocess.run(
        [
            "bash",
            "examples/continue_from_hf.sh",
            str(hf_dir),
            "examples/configs/danube-tiny-cpu.yaml",
            f"run_dir={run_dir}",
            f"data.blend=[{corpus}]",
            "data.demo_corpus_prefix=null",
            "train.train_tokens=4096",
            "optim.warmup_tokens=1024",
            "logging.log_interval=1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "starting from the weights of" in proc.stdout and "resumed from" not in proc.stdout
    first_loss = train_losses(run_dir)[1]
    assert first_loss > 12.0  # a fresh init gives ~ln(32000) = 10.4; the loaded weights far more
    proc = subprocess.run(
        [
            "bash",
            "examples/convert_to_hf.sh",
            str(run_dir),
            str(tmp_path / "hf-out"),
            "--dtype",
            "float32",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "top1_agreement: 1" in proc.stdout


@pytest.mark.parametrize(
    "config",
    ["examples/configs/danube-1.8b-dpo2.yaml", "examples/configs/danube-1.8b-sft-lora.yaml"],
)
def test_example_chat_configs_that_share_a_run_path_plan_as_written(tmp_path, config):
    """Recipes whose run path a recipe above already runs (DPO stage 2, SFT with LoRA, which
    tests/training/test_lora_run.py trains): the whole preflight, at their real size."""
    from megatron_danube.config import load_config
    from megatron_danube.data.demo_chat import ensure_demo_chat
    from megatron_danube.training.preflight import build_plan
    from tests.training.conftest import hf_model

    ensure_demo_chat(str(tmp_path / "chat"))
    start = hf_model(tmp_path / "start", seed=0)
    data = tmp_path / "chat" / ("pairs_train.jsonl" if "dpo" in config else "train.jsonl")
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        "data.tokenizer=mistral-v1",
        f"chat.train=[{data}]",
        f"checkpoint.load={start}",
        "model.spec=local",
        "train.device=cpu",
        "train.global_batch_tokens=" + str(load_config(config).chat.seq_length),
    ]
    plan = build_plan(load_config(config, overrides))
    assert plan.job in ("sft", "dpo") and plan.start.convert_from_hf == start
    if "lora" in config:
        assert plan.lora.rank == 16 and len(plan.lora.targets) == 4


@pytest.mark.parametrize(
    "config,data",
    [
        ("examples/configs/danube-1.8b-sft.yaml", "train.jsonl"),
        ("examples/configs/danube-1.8b-dpo.yaml", "pairs_train.jsonl"),
        ("examples/configs/danube-1.8b-dpo-lora.yaml", "pairs_train.jsonl"),
    ],
)
def test_example_chat_configs_at_tiny_scale(tmp_path, config, data):
    """The 1.8b SFT and DPO recipes with a tiny model, the demo chat data, 2 steps."""
    import json

    from megatron_danube.data.demo_chat import ensure_demo_chat
    from tests.training.conftest import hf_model

    ensure_demo_chat(str(tmp_path / "chat"))
    records = (tmp_path / "chat" / data).read_text().splitlines()[:40]
    (tmp_path / "small.jsonl").write_text("\n".join(records) + "\n")
    start = hf_model(tmp_path / "start", seed=0)
    run_dir = tmp_path / "run"
    args = [
        "--config",
        config,
        *TINY_MODEL,
        f"run_dir={run_dir}",
        "data.tokenizer=mistral-v1",
        f"chat.train=[{tmp_path / 'small.jsonl'}]",
        "chat.seq_length=512",
        "train.global_batch_tokens=1024",
        "optim.warmup_tokens=0",
        f"checkpoint.load={start}",
        "train.exit_after_steps=2",
        "logging.eval_at_start=false",
    ]
    launch("megatron_danube.finetune", *args, check=True)
    steps = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert [r["iteration"] for r in steps if "loss" in r][-1] == 2
