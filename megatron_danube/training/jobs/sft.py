"""Supervised chat fine-tuning: packed conversations, loss on what the assistant wrote.

The data is tokenized once and cached (`data/chat`), packed into rows of `chat.seq_length`
tokens with attention, RoPE positions and labels restarting at every conversation, and the
loss is the mean over supervised tokens of the whole global batch (megatron's
`calculate_per_token_loss`: token sums, divided once by the batch's supervised-token count
across micro-batches and data-parallel ranks), so short and long samples weigh per token alike.
The step plan (which packs each step reads) is a function of the step index only, so a resume
reads exactly what an uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training import run_inputs
from megatron_danube.training.step import LM_REPORTS, lm_loss, packed_forward_step
from megatron_danube.training.trainer import StepBatch, TrainState

logger = logging.getLogger(__name__)

HF_BASE_DIR = "base_from_hf"
CONVERT_TIMEOUT_S = 3600  # a 1.8B model converts in well under a minute


def is_hf_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.exists(
        os.path.join(path, "latest")
    )


def check_config(cfg: RunConfig):
    """Everything checkable before a process group exists: (model, tokenizer, layout answer)."""
    from megatron_danube.data.chat.encoder import chat_backend
    from megatron_danube.data.chat.records import check_files
    from megatron_danube.data.chat.template import ChatTemplate, resolve_template
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import check_layout
    from megatron_danube.training.jobs.pretrain import check_run_dir, load_run_tokenizer

    chat, train = cfg.chat, cfg.train
    if len(cfg.stages) > 1:
        raise DanubeConfigError(
            "stages schedule pretraining; a fine-tuning run uses chat.seq_length, remove stages"
        )
    if cfg.parallel.context_parallel > 1:
        # Packed rows would need splitting per CP rank by document (TE's THD partitioning).
        raise DanubeConfigError(
            "chat fine-tuning packs conversations and does not split them over context-parallel "
            "ranks; set parallel.context_parallel=1 (use TP/PP/DP)"
        )
    model = get_preset(cfg.model.preset).replace(**cfg.model.overrides)
    checked = check_layout(
        model,
        cfg.parallel,
        spec=cfg.model.spec,
        device=cfg.train.device,
        seq_length=chat.seq_length,
        fp8=cfg.precision.fp8,
    )
    dp = cfg.parallel.data_parallel(checked[0].world_size)
    packs_per_step, rem = divmod(train.global_batch_tokens, chat.seq_length)
    if rem or packs_per_step % (dp * train.micro_batch_size):
        raise DanubeConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} must be chat.seq_length "
            f"({chat.seq_length}) x a multiple of data-parallel size x micro_batch_size "
            f"({dp} x {train.micro_batch_size}); e.g. "
            f"{chat.seq_length * dp * train.micro_batch_size}"
        )
    if chat.demo_dir:
        from megatron_danube.data.demo_chat import ensure_demo_chat

        ensure_demo_chat(chat.demo_dir)
    if not chat.train:
        raise DanubeConfigError("job: sft needs chat.train (JSONL conversation files)")
    files = {"chat.train": check_files(chat.train, "chat.train")}
    if chat.valid:
        files["chat.valid"] = check_files(chat.valid, "chat.valid")
    if not cfg.checkpoint.load:
        raise DanubeConfigError(
            "job: sft starts from trained weights; set checkpoint.load to a run directory, a "
            "checkpoint, or an HF model directory"
        )
    if not os.path.isdir(cfg.checkpoint.load):
        raise DanubeConfigError(f"checkpoint.load={cfg.checkpoint.load} is not a directory")
    check_run_dir(cfg.run_dir)
    tokenizer = load_run_tokenizer(cfg, model, "use the tokenizer the model was trained with")
    _, special = chat_backend(tokenizer)
    template = resolve_template(chat.template)
    ChatTemplate(template, special)  # a broken template fails now
    inputs = run_inputs.run_inputs(tokenizer, template, files)
    if not run_inputs.check_resume(cfg, inputs):
        run_inputs.check_start(cfg.checkpoint.load, inputs)
    return model, tokenizer, checked, inputs


def hf_start_dir(hf_dir: str, run_dir: str) -> str:
    """Where the run keeps its conversion of `hf_dir`: named by the source's path and files
    (name, size, modification time), so other or changed weights are converted afresh."""
    import hashlib

    digest = hashlib.sha256(os.path.abspath(hf_dir).encode())
    for name in sorted(os.listdir(hf_dir)):
        info = os.stat(os.path.join(hf_dir, name))
        digest.update(f"|{name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return os.path.join(run_dir, f"{HF_BASE_DIR}-{digest.hexdigest()[:12]}")


def convert_hf_start(hf_dir: str, run_dir: str) -> str:
    """The HF model as a checkpoint under the run dir, converted once (by the caller's rank)."""
    from megatron_danube.runtime.distributed import launcher_free_env

    out = hf_start_dir(hf_dir, run_dir)
    if os.path.exists(os.path.join(out, "manifest.json")):
        return out
    logger.info("converting the HF model %s to %s (once)", hf_dir, out)
    env = launcher_free_env()
    # A separate process: the converter runs its own one-rank process group.
    cmd = [sys.executable, "-m", "megatron_danube.cli.convert", "--to", "mcore"]
    try:
        proc = subprocess.run(
            cmd + ["--load", hf_dir, "--save", out],
            env=env,
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise DanubeConfigError(
            f"converting {hf_dir} took over {CONVERT_TIMEOUT_S} s; convert it first with "
            f"danube-convert --to mcore and set checkpoint.load to the result"
        ) from None
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        reason = (errors or proc.stderr.strip().splitlines() or ["no output"])[-1].strip()
        raise DanubeConfigError(f"converting {hf_dir} failed (exit {proc.returncode}): {reason}")
    return out


class SFTJob:
    """The `Job` of chat fine-tuning."""

    kind = "sft"  # what the data files hold: conversations
    forward_step = staticmethod(packed_forward_step)
    report_sizes = LM_REPORTS
    transformer_overrides: Dict[str, object] = {"calculate_per_token_loss": True}
    loss = staticmethod(lm_loss)

    def __init__(self, cfg: RunConfig, model_cfg, tokenizer, checked=None, inputs=None):
        self.cfg, self.model_cfg, self.tokenizer = cfg, model_cfg, tokenizer
        self.checked_layout = checked
        self.inputs = inputs or {}  # what the run reads, by content (training/run_inputs.py)
        self.seq_length = cfg.chat.seq_length
        self.max_seq_length = self.seq_length  # RoPE positions restart per conversation
        self.packs_per_step = cfg.train.global_batch_tokens // self.seq_length
        self.sample_length = self.seq_length  # the longest sample a row takes
        self.total_tokens = 0  # known once the data is read (setup)

    # ------------------------------------------------------------------------------ data
    def setup(self, rt, is_main: bool) -> None:
        from megatron.core import parallel_state
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

        self.rt = rt
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self._start_weights(is_main)
        self.train_samples, self.valid_samples, self.data_key = self._read_data(is_main)
        self.train_packs = self._packs(self.train_samples, self.cfg.chat.epochs, shuffle=True)
        self.valid_packs = self._packs(self.valid_samples, 1, shuffle=False)
        steps = math.ceil(len(self.train_packs) / self.packs_per_step)
        self.total_tokens = steps * self.cfg.train.global_batch_tokens
        if self.cfg.optim.warmup_tokens >= self.total_tokens:
            raise DanubeConfigError(
                f"optim.warmup_tokens {self.cfg.optim.warmup_tokens} must be below the run's "
                f"{self.total_tokens} tokens ({steps} steps of {self.packs_per_step} packs)"
            )
        self._log_plan(steps)
        init_num_microbatches_calculator(
            rt.rank,
            None,
            self.packs_per_step,
            self.cfg.train.micro_batch_size,
            rt.data_parallel,
            decrease_batch_size_if_needed=False,
        )

    def _start_weights(self, is_main: bool) -> None:
        load = self.cfg.checkpoint.load
        self.cfg.checkpoint.load_optimizer = False  # fine-tuning starts from weights only
        if not is_hf_model_dir(load):
            return
        problem = None
        if is_main:
            try:
                convert_hf_start(load, self.cfg.run_dir)
            except DanubeConfigError as exc:
                problem = str(exc)
        from megatron_danube.runtime.distributed import raise_rank0_problem

        raise_rank0_problem(problem)
        self.cfg.checkpoint.load = hf_start_dir(load, self.cfg.run_dir)

    def _read_data(self, is_main: bool):
        from megatron_danube.data.chat.dataset import describe, load_or_build
        from megatron_danube.data.chat.encoder import ChatEncoder
        from megatron_danube.data.chat.records import check_files
        from megatron_danube.data.chat.template import resolve_template

        chat = self.cfg.chat
        self.template = resolve_template(chat.template)
        encoder = ChatEncoder(self.tokenizer, self.template, self.sample_length, chat.truncation)
        cache_dir = os.path.join(self.cfg.run_dir, "data_cache")
        sets = {"train": check_files(chat.train, "chat.train")}
        if chat.valid:
            sets["valid"] = check_files(chat.valid, "chat.valid")
        loaded, keys = {}, {}
        for build in (True, False):  # rank 0 builds the caches, then every rank reads them
            if build == is_main:
                for name, paths in sets.items():
                    loaded[name], path = load_or_build(
                        paths, encoder, cache_dir, name, build, kind=self.kind
                    )
                    keys[name] = os.path.basename(path)
            dist.barrier()
        for name, samples in loaded.items():
            log = logger.warning if samples.stats.get("bad_records") else logger.info
            log("chat %s data: %s", name, describe(samples.stats))
        train = loaded["train"]
        if len(train) == 0:
            raise DanubeConfigError(f"chat.train has no usable sample ({describe(train.stats)})")
        valid = loaded.get("valid")
        if valid is None and chat.valid_fraction > 0:
            valid, train = self._hold_out(train, chat.valid_fraction)
        # Names every tokenized set the run reads (DPO keys its reference log-probs by it).
        return train, valid, "+".join(keys[name] for name in sets)

    def _hold_out(self, samples, fraction: float):
        """(held-out, rest), a deterministic share of the samples."""
        order = np.random.default_rng(self.cfg.data.seed).permutation(len(samples))
        held = max(1, int(round(len(samples) * fraction)))
        return samples.subset(np.sort(order[:held])), samples.subset(np.sort(order[held:]))

    def _packs(self, samples, epochs: int, shuffle: bool) -> List[List[int]]:
        from megatron_danube.data.chat.packing import epoch_packs

        if samples is None or len(samples) == 0:
            return []
        return epoch_packs(
            self._unit_lengths(samples),
            self.seq_length,
            epochs=epochs,
            seed=self.cfg.data.seed,
            pack=self.cfg.chat.pack,
            shuffle=shuffle,
        )

    def _unit_lengths(self, samples) -> np.ndarray:
        """Lengths of what packing places whole (a conversation here)."""
        return samples.lengths

    def _microbatch(self, samples, packs: List[List[int]]) -> dict:
        from megatron_danube.data.chat.packing import packed_microbatch

        return packed_microbatch(samples, packs, self.seq_length, self.tokenizer.eod)

    def _log_plan(self, steps: int) -> None:
        lengths = self._unit_lengths(self.train_samples)
        used = sum(int(lengths[i]) for p in self.train_packs for i in p)
        capacity = len(self.train_packs) * self.seq_length
        logger.info(
            "%s plan: %d packs of %d tokens (%.1f%% filled) over %d epoch(s) -> %d steps of "
            "%d packs; %d validation packs",
            self.kind,
            len(self.train_packs),
            self.seq_length,
            100.0 * used / max(capacity, 1),
            self.cfg.chat.epochs,
            steps,
            self.packs_per_step,
            len(self.valid_packs),
        )

    # ------------------------------------------------------------------------------ batches
    def _batch(self, samples, packs: List[List[int]]) -> StepBatch:
        from megatron_danube.training.metrics import flops_per_token

        mbs, gbt = self.cfg.train.micro_batch_size, self.cfg.train.global_batch_tokens
        packs = packs + [[] for _ in range(self.packs_per_step - len(packs))]  # the last step
        per_rank = self.packs_per_step // self.rt.data_parallel
        mine = packs[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        micro = [self._microbatch(samples, mine[i : i + mbs]) for i in range(0, per_rank, mbs)]
        chunks = max(1, self.cfg.parallel.virtual_pipeline)
        return StepBatch(
            iterators=[iter(list(micro)) for _ in range(chunks)],
            num_microbatches=len(micro),
            seq_length=mbs * self.seq_length,  # one THD row per micro-batch
            micro_batch_size=1,
            tokens=gbt,
            flops=gbt * flops_per_token(self.model_cfg, self.seq_length),
            labels={"seq_length": self.seq_length},
        )

    def train_batch(self, state: TrainState) -> StepBatch:
        step = state.consumed_tokens // self.cfg.train.global_batch_tokens
        first = step * self.packs_per_step
        return self._batch(
            self.train_samples, self.train_packs[first : first + self.packs_per_step]
        )

    def eval_batches(self, state: TrainState) -> List[StepBatch]:
        n = self.packs_per_step
        return [
            self._batch(self.valid_samples, self.valid_packs[i : i + n])
            for i in range(0, len(self.valid_packs), n)
        ]

    def eval_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        loss = lm_loss(reports)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50)),
            "val_supervised_tokens": float(reports["lm loss"][1]),
        }

    def state_extra(self, state: TrainState) -> dict:
        # The export writes this template into tokenizer_config.json (danube-convert --to hf).
        return {"job": self.kind, "chat_data": self.data_key, "chat_template": self.template}


def build(cfg: RunConfig) -> Tuple[SFTJob, object]:
    """(job, model config) after every up-front check."""
    model_cfg, tokenizer, checked, inputs = check_config(cfg)
    return SFTJob(cfg, model_cfg, tokenizer, checked, inputs), model_cfg
