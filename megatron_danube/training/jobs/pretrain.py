"""Pretraining: GPTDataset blends under the Danube stage schedule, next-token loss.

The stage (sequence length and blend) is a function of consumed tokens, and each step reads
the samples its position in the stage names, so a resume anywhere reads exactly what an
uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, List

import torch

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training import preflight, run_inputs
from megatron_danube.training.job import Job, StepBatch, TrainState
from megatron_danube.training.jobs.registry import JobSpec, register_job
from megatron_danube.training.plan import Plan
from megatron_danube.training.stages import Stage, check_stage_lengths, plan_stages, stage_at
from megatron_danube.training.step import LM_REPORTS, lm_forward_step, lm_loss

logger = logging.getLogger(__name__)


def plan(cfg: RunConfig) -> Plan:
    """Everything checkable before a process group or any data exists, as the run's Plan."""
    from megatron_danube.data.datasets import check_prefixes, parse_blend

    if cfg.peft.method is not None:
        raise DanubeConfigError(
            "peft trains adapters of a fine-tuning job (job: sft or dpo); remove peft.method "
            "for pretraining"
        )
    model = preflight.model_of(cfg)
    check_stage_lengths(cfg, model)
    layout, dp = preflight.check_layout_for(
        cfg, model, max(stage.seq_length for stage in cfg.stages)
    )
    stages = plan_stages(cfg, dp)
    preflight.check_run_dir(cfg.run_dir)
    tokenizer = preflight.run_tokenizer(
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
    preflight.check_warmup(cfg, cfg.train.train_tokens, "train.train_tokens")
    inputs = run_inputs.run_inputs(tokenizer)
    resumes, start = preflight.start_point(cfg, inputs, weights_only=False)
    return Plan(
        config=cfg,
        model=model,
        layout=layout,
        data_parallel=dp,
        max_seq_length=max(s.seq_length for s in stages),
        tokenizer=tokenizer,
        inputs=inputs,
        resumes=resumes,
        start=start,
        stages=tuple(stages),
    )


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


class PretrainJob(Job):
    """The `Job` of pretraining: stage-scheduled GPTDataset batches, mean token loss."""

    name = "pretrain"
    forward_step = staticmethod(lm_forward_step)
    report_sizes = LM_REPORTS
    # Every micro-batch has the same token count: megatron's per-micro-batch mean is exact.

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.model_cfg, self.tokenizer = plan.model, plan.tokenizer
        self.stages: List[Stage] = list(plan.stages)
        self.current = None
        self.train_ds = self.valid_ds = None

    def setup(self, rt) -> None:
        from megatron.core import parallel_state
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

        from megatron_danube.data.demo_corpus import ensure_demo_corpus

        if rt.is_main and self.cfg.data.demo_corpus_prefix:
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

    def schedule(self) -> dict:
        cfg = self.cfg
        return {
            "train.train_tokens": cfg.train.train_tokens,
            "train.global_batch_tokens": cfg.train.global_batch_tokens,
            "stages": [[s.start_tokens, s.seq_length] for s in cfg.stages],
            "data.seed": cfg.data.seed,
            "data.split": cfg.data.split,
        }


register_job(
    JobSpec(
        name="pretrain",
        family="pretrain",
        plan=plan,
        make=PretrainJob,
        summary="token stages over indexed corpora, next-token loss",
    )
)
