"""Pretraining: GPTDataset blends under the Danube stage schedule, next-token loss.

The stage (sequence length and blend) is a function of consumed tokens, and each step reads
the samples its position in the stage names, so a resume anywhere reads exactly what an
uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, List, Tuple

import torch

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training import run_inputs
from megatron_danube.training.stages import Stage, plan_stages, stage_at
from megatron_danube.training.step import LM_REPORTS, lm_forward_step, lm_loss
from megatron_danube.training.trainer import StepBatch, TrainState

logger = logging.getLogger(__name__)


def check_run_dir(run_dir: str) -> None:
    """The run directory can be created and written, before any process group exists."""
    probe = run_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe):
        raise DanubeConfigError(f"run_dir {run_dir}: {probe} is a file; choose another run_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DanubeConfigError(f"run_dir {run_dir}: {probe} is not writable; choose another")
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.exists(ckpts) and not os.path.isdir(ckpts):
        raise DanubeConfigError(f"{ckpts} is a file; move it away or choose another run_dir")


def load_run_tokenizer(cfg: RunConfig, model, fix: str):
    """The run's tokenizer, refused (naming `fix`) when it has more tokens than the model."""
    from megatron_danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    if tokenizer.vocab_size > model.vocab_size:
        raise DanubeConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model {model.name} has vocab "
            f"{model.vocab_size}; {fix}"
        )
    return tokenizer


def check_config(cfg: RunConfig):
    """Everything that can be checked before a process group or any data exists.

    Returns (model config, planned stages, tokenizer, the layout check's answer).
    """
    from megatron_danube.data.datasets import check_prefixes, parse_blend
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import check_layout

    model = get_preset(cfg.model.preset).replace(**cfg.model.overrides)
    max_seq = max(stage.seq_length for stage in cfg.stages)
    checked = check_layout(
        model,
        cfg.parallel,
        spec=cfg.model.spec,
        device=cfg.train.device,
        seq_length=max_seq,
        fp8=cfg.precision.fp8,
    )
    launch, device_type, _ = checked
    stages = plan_stages(cfg, cfg.parallel.data_parallel(launch.world_size), max_seq)
    check_run_dir(cfg.run_dir)
    tokenizer = load_run_tokenizer(
        cfg, model, "use a matching tokenizer or model.overrides.vocab_size"
    )
    _check_split(cfg.data.split)
    missing_ok = {cfg.data.demo_corpus_prefix} if cfg.data.demo_corpus_prefix else set()
    for stage in stages:
        own = cfg.stages[stage.index].blend is not None
        prefixes, _ = parse_blend(
            list(stage.blend), f"stages[{stage.index}].blend" if own else "data.blend"
        )
        check_prefixes([p for p in prefixes if p not in missing_ok])
    if not cfg.optim.warmup_tokens < cfg.train.train_tokens:
        raise DanubeConfigError(
            f"optim.warmup_tokens {cfg.optim.warmup_tokens} must be below "
            f"train.train_tokens {cfg.train.train_tokens}"
        )
    if cfg.precision.params_dtype == "float16" and device_type != "cuda":
        raise DanubeConfigError("precision.params_dtype=float16 needs a GPU; use float32 on CPU")
    if cfg.checkpoint.load and not os.path.isdir(cfg.checkpoint.load):
        raise DanubeConfigError(f"checkpoint.load={cfg.checkpoint.load} is not a directory")
    inputs = run_inputs.run_inputs(tokenizer)
    if not run_inputs.check_resume(cfg, inputs):
        run_inputs.check_start(cfg.checkpoint.load, inputs)
    return model, stages, tokenizer, checked, inputs


def _check_split(split: str) -> None:
    try:
        parts = [float(p) for p in split.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 or not math.isfinite(p) for p in parts) or parts[0] <= 0:
        raise DanubeConfigError(
            f"data.split={split!r}; give three non-negative train,valid,test parts with a "
            f"positive train part, e.g. 98,2,0"
        )


class PretrainJob:
    """The `Job` of pretraining: stage-scheduled GPTDataset batches, mean token loss."""

    forward_step = staticmethod(lm_forward_step)
    report_sizes = LM_REPORTS
    # Every micro-batch has the same token count: megatron's per-micro-batch mean is exact.
    transformer_overrides: Dict[str, object] = {}

    def __init__(
        self, cfg: RunConfig, model_cfg, stages: List[Stage], tokenizer, checked=None, inputs=None
    ):
        self.cfg, self.model_cfg, self.stages, self.tokenizer = cfg, model_cfg, stages, tokenizer
        self.checked_layout = checked  # check_layout's answer, so start-up validates once
        self.inputs = inputs or {}  # what the run reads, by content (training/run_inputs.py)
        self.total_tokens = cfg.train.train_tokens
        self.max_seq_length = max(s.seq_length for s in stages)
        self.current = None
        self.train_ds = self.valid_ds = None

    def setup(self, rt, is_main: bool) -> None:
        from megatron.core import parallel_state
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

        from megatron_danube.data.demo_corpus import ensure_demo_corpus

        if is_main and self.cfg.data.demo_corpus_prefix:
            ensure_demo_corpus(self.cfg.data.demo_corpus_prefix, self.tokenizer)
        self.rt = rt
        self.dp_rank = parallel_state.get_data_parallel_rank()
        init_num_microbatches_calculator(
            rt.rank,
            None,
            self.stages[0].global_batch_seqs,
            self.cfg.train.micro_batch_size,
            rt.data_parallel,
            decrease_batch_size_if_needed=False,
        )

    def _enter_stage(self, stage: Stage) -> None:
        from megatron.core.num_microbatches_calculator import (
            reconfigure_num_microbatches_calculator,
        )

        from megatron_danube.data.datasets import build_datasets

        self.current = stage
        self.train_ds, self.valid_ds = build_datasets(
            list(stage.blend),
            seq_length=stage.seq_length,
            split=self.cfg.data.split,
            train_samples=stage.num_samples,
            valid_samples=self.cfg.logging.eval_iters * stage.global_batch_seqs,
            tokenizer=self.tokenizer,
            seed=self.cfg.data.seed,
            cache_dir=os.path.join(self.cfg.run_dir, "data_cache"),
        )
        reconfigure_num_microbatches_calculator(
            self.rt.rank,
            None,
            stage.global_batch_seqs,
            self.cfg.train.micro_batch_size,
            self.rt.data_parallel,
            decrease_batch_size_if_needed=False,
        )
        logger.info(
            "stage %d: seq_length %d, %d sequences/step, %d micro-batch%s/rank, from %s tokens",
            stage.index,
            stage.seq_length,
            stage.global_batch_seqs,
            stage.num_microbatches,
            "" if stage.num_microbatches == 1 else "es",
            f"{stage.start_tokens:,}",
        )

    def _batch(self, dataset, stage: Stage, first_sample: int) -> StepBatch:
        from megatron_danube.data.datasets import step_iterators
        from megatron_danube.training.metrics import flops_per_token

        mbs, gbt = self.cfg.train.micro_batch_size, self.cfg.train.global_batch_tokens
        iterators = step_iterators(
            dataset,
            first_sample=first_sample,
            global_batch=stage.global_batch_seqs,
            dp_rank=self.dp_rank,
            dp_size=self.rt.data_parallel,
            micro_batch_size=mbs,
            num_chunks=self.num_chunks,
        )
        return StepBatch(
            iterators=iterators,
            num_microbatches=stage.num_microbatches,
            seq_length=stage.seq_length,
            micro_batch_size=mbs,
            tokens=gbt,
            flops=gbt * flops_per_token(self.model_cfg, stage.seq_length),
            labels={"stage": stage.index, "seq_length": stage.seq_length},
        )

    @property
    def num_chunks(self) -> int:
        return max(1, self.cfg.parallel.virtual_pipeline)

    def train_batch(self, state: TrainState) -> StepBatch:
        stage = stage_at(self.stages, state.consumed_tokens)
        if stage != self.current:
            self._enter_stage(stage)
        return self._batch(self.train_ds, stage, stage.sample_index(state.consumed_tokens))

    def eval_batches(self, state: TrainState) -> List[StepBatch]:
        if self.current is None:
            self._enter_stage(stage_at(self.stages, state.consumed_tokens))
        stage, valid = self.current, self.valid_ds
        if valid is None or len(valid) < stage.global_batch_seqs:
            return []
        count = min(self.cfg.logging.eval_iters, len(valid) // stage.global_batch_seqs)
        return [self._batch(valid, stage, i * stage.global_batch_seqs) for i in range(count)]

    loss = staticmethod(lm_loss)

    def eval_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        loss = lm_loss(reports)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def state_extra(self, state: TrainState) -> dict:
        return {"stage": stage_at(self.stages, max(state.consumed_tokens - 1, 0)).index}


def build(cfg: RunConfig) -> Tuple[PretrainJob, object]:
    """(job, model config) after every up-front check."""
    model_cfg, stages, tokenizer, checked, inputs = check_config(cfg)
    return PretrainJob(cfg, model_cfg, stages, tokenizer, checked, inputs), model_cfg
