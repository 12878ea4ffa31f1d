"""danube-finetune `job: dpo` on the CPU against TRL's DPOTrainer, the reference guard, and an
overfit smoke test. The model is a random danube-tiny saved as an HF Mistral directory with
the project's tokenizer and the Danube chat template."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.launch import run_finetune
from tests.training.conftest import hf_model

pytestmark = pytest.mark.slow

TRL_KEYS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def finetune(run_dir, *overrides, nproc=1, config="tests/training/tiny_dpo.yaml", check=True):
    return run_finetune(run_dir, *overrides, config=config, nproc=nproc, check=check)


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_trl(out, start, pairs, *peft):
    """TRL's two DPO steps (tests/training/trl_dpo_reference.py) in their own process, with
    `peft` = (ADAPTER_DIR, HOW) for LoRA; its per-step log."""
    pytest.importorskip("trl")
    script = os.path.join(REPO, "tests", "training", "trl_dpo_reference.py")
    proc = subprocess.run(
        [sys.executable, script, start, pairs, str(out), "0.2", "0.05", *peft],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def trl_log(tmp_path_factory, start, pairs):
    return run_trl(tmp_path_factory.mktemp("trl") / "log.json", start, pairs)


@pytest.fixture(scope="module")
def single_rank_run(tmp_path_factory, start, pairs):
    run_dir = tmp_path_factory.mktemp("dpo") / "tp1"
    finetune(run_dir, f"chat.train=[{pairs}]", f"checkpoint.load={start}")
    return str(run_dir)


def bfd_rows(pairs, seq_length):
    """The rows best-fit packing makes of the pairs file (each side gets half a row)."""
    from megatron_danube.data.chat.dataset import encode_files
    from megatron_danube.data.chat.encoder import ChatEncoder
    from megatron_danube.data.chat.packing import bfd_packs
    from megatron_danube.data.chat.preference import pair_lengths
    from megatron_danube.data.chat.template import DANUBE_TEMPLATE
    from megatron_danube.data.tokenizer import load_tokenizer

    encoder = ChatEncoder(load_tokenizer("mistral-v1"), DANUBE_TEMPLATE, seq_length // 2)
    samples = encode_files([pairs], encoder, "pairs", kind="dpo")
    return bfd_packs(pair_lengths(samples), seq_length)


def assert_steps_match(records, log):
    """Our two logged DPO steps against TRL's, key by key, within 1e-4 relative; the steps."""
    steps = [r for r in records if "rewards/chosen" in r]
    assert len(steps) == len(log) == 2
    for ours, theirs in zip(steps, log):
        for key in TRL_KEYS:
            assert math.isclose(ours[key], theirs[key], rel_tol=1e-4, abs_tol=1e-5), (
                key,
                ours[key],
                theirs[key],
            )
    return steps


def assert_like_trl(records, trl_log):
    steps = assert_steps_match(records, trl_log)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference
    assert steps[1]["rewards/margins"] > 0.1  # the second step compares something real


def test_one_rank_matches_trl(single_rank_run, trl_log):
    assert_like_trl(metrics(single_rank_run), trl_log)


def test_tp2_pp2_matches_trl(tmp_path, start, pairs, trl_log):
    """Packed best-fit (several pairs a row; TRL pads one pair a row): the same numbers, with
    a global batch of one epoch's rows, as TRL's batch is every pair."""
    run_dir = tmp_path / "tp2pp2"
    rows = len(bfd_rows(pairs, seq_length=512))
    assert rows < 6  # pairs do share rows
    layout = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "chat.packing=bfd"]
    layout.append(f"train.global_batch_tokens={rows * 512}")
    finetune(run_dir, f"chat.train=[{pairs}]", f"checkpoint.load={start}", *layout, nproc=4)
    assert_like_trl(metrics(str(run_dir)), trl_log)


def test_precomputed_reference_equals_online_logps(single_rank_run, start, pairs):
    """The stored log-probabilities equal the HF model's, computed here pair by pair."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stored = np.load(os.path.join(single_rank_run, "reference_logps.npz"))["train"]
    tok = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    for i, line in enumerate(open(pairs)):
        record = json.loads(line)
        prompt = [{"role": "user", "content": record["prompt"]}]
        head = tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)
        for side, key in enumerate(("chosen", "rejected")):
            full = prompt + [{"role": "assistant", "content": record[key]}]
            ids = tok.apply_chat_template(full, return_dict=True)["input_ids"]
            start_at = len(head["input_ids"])
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logps = torch.log_softmax(logits[:-1], -1)[torch.arange(len(ids) - 1), ids[1:]]
            online = logps[start_at - 1 :].sum().item()
            assert stored[2 * i + side] == pytest.approx(online, rel=1e-5), (i, key)


def test_changed_reference_is_refused(single_rank_run, tmp_path, pairs):
    other = hf_model(tmp_path / "other", seed=1)
    proc = finetune(
        single_rank_run, f"chat.train=[{pairs}]", f"checkpoint.load={other}", check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "reference log-probabilities of another reference" in lines[0]


def test_a_run_resumes_without_its_start_and_names_a_damaged_reference(
    single_rank_run, tmp_path, pairs
):
    """Its own checkpoints and reference log-probabilities are all a run needs once it has
    them (the start may be pruned); a damaged reference file after step 0 is one line."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(single_rank_run, run_dir)
    reference = run_dir / "reference_logps.npz"
    intact = reference.read_bytes()
    reference.write_bytes(intact[: len(intact) // 2])
    args = [f"chat.train=[{pairs}]", f"checkpoint.load={tmp_path / 'pruned_start'}"]
    proc = finetune(run_dir, *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{reference} is damaged (BadZipFile)" in proc.stderr
    reference.write_bytes(intact)
    proc = finetune(run_dir, *args)
    assert "this run finished earlier" in proc.stderr + proc.stdout


def test_overfit_sixteen_pairs(tmp_path, start):
    from megatron_danube.data.demo_chat import preference_pairs

    train, _ = preference_pairs()
    path = tmp_path / "pairs16.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in train[:64:4]))
    run_dir = tmp_path / "overfit"
    finetune(
        run_dir,
        f"chat.train=[{path}]",
        f"chat.valid=[{path}]",
        f"checkpoint.load={start}",
        "chat.packing=bfd",
        "chat.epochs=12",
        "train.global_batch_tokens=2048",
        "optim.optimizer=adam",
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "logging.eval_interval=4",
        "logging.eval_at_start=true",
        nproc=2,
    )
    evals = [r for r in metrics(str(run_dir)) if "eval_rewards/accuracies" in r]
    margins = [r["eval_rewards/margins"] for r in evals]
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[-1]["eval_rewards/accuracies"] == 1.0, evals[-1]
    assert all(b > a for a, b in zip(margins, margins[1:])), margins


def test_resume_with_changed_inputs_is_refused_and_keeps_every_checkpoint(
    single_rank_run, tmp_path, start, pairs, other_tokenizer
):
    import shutil

    from tests.training.conftest import plan_error
    from tests.training.test_sft_run import changed_inputs, launch_finetune, refuse_changed_inputs

    run_dir = str(tmp_path / "run")
    shutil.copytree(single_rank_run, run_dir)
    records = [json.loads(line) for line in open(pairs)]
    data, template, tokenizer = changed_inputs(tmp_path, records, other_tokenizer, "chosen")

    config = "tests/training/tiny_dpo.yaml"

    def run(run_dir, *overrides):
        return launch_finetune(run_dir, config, f"checkpoint.load={start}", *overrides)

    def preflight(run_dir, *overrides):
        return plan_error(
            f"run_dir={run_dir}", f"checkpoint.load={start}", *overrides, config=config
        )

    refuse_changed_inputs(
        run,
        run_dir,
        [
            ([f"chat.train=[{data}]"], "chat.train (the files' contents)"),
            ([f"chat.train=[{pairs}]", f"chat.template={template}"], "chat.template (its text)"),
            ([f"chat.train=[{pairs}]", f"data.tokenizer={tokenizer}"], "data.tokenizer"),
        ],
        preflight,
    )
