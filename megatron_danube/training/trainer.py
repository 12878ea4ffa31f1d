"""One training loop for every job: build, resume, then step, log, evaluate, save, stop.

What differs between pretraining, SFT and DPO (datasets and batches, the forward step and
its loss reports, metrics, the schedule's length) comes in as a `Job`; the loop itself is
`Trainer.train`. Checkpoint intervals are the checkpointer's business, signals are handled
from process start (`StopRequest`), and every rank takes each decision together.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_danube.config import RunConfig, save_config
from megatron_danube.runtime.stop import StopRequest
from megatron_danube.training import resume_checks
from megatron_danube.training.checkpointing import CheckpointManager
from megatron_danube.training.metrics import MetricsWriter, StepWindow, Throughput
from megatron_danube.training.run_lock import RunDirLock

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    iteration: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    bad_steps_in_row: int = 0


@dataclass
class StepBatch:
    """One global step's work for this rank, as a job describes it."""

    iterators: List[Iterator]
    """One micro-batch iterator per model chunk."""
    num_microbatches: int
    seq_length: int
    micro_batch_size: int
    tokens: int
    """Tokens the step consumes from the schedule (the same on every rank)."""
    flops: float
    """Model FLOPs of the whole step (all ranks)."""
    labels: Dict[str, int] = field(default_factory=dict)
    """Logged with the step, e.g. the stage and its sequence length."""


class Job(Protocol):
    """What a training job provides to the loop."""

    forward_step: Callable
    """megatron forward-step function: (data_iterator, model) -> (output, loss_func)."""
    report_sizes: Dict[str, int]
    """Names and lengths of the loss function's reports."""
    total_tokens: int
    """Length of the schedule, in tokens."""
    max_seq_length: int
    """The longest sequence the job feeds the model."""
    transformer_overrides: Dict[str, object]
    """TransformerConfig fields the job needs, e.g. `calculate_per_token_loss`."""
    inputs: Dict[str, str]
    """What the run reads, by content (training/run_inputs.py); recorded in every checkpoint."""

    def setup(self, rt, is_main: bool) -> None:
        """Prepare data; called once on every rank after the process group exists."""

    def train_batch(self, state: TrainState) -> StepBatch: ...

    def eval_batches(self, state: TrainState) -> List[StepBatch]:
        """The validation batches (empty: nothing to validate on)."""

    def loss(self, reports: Dict[str, torch.Tensor]) -> float: ...

    def eval_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]: ...

    def state_extra(self, state: TrainState) -> dict:
        """What the job records in each checkpoint's train state."""

    # Optional: `after_resume(trainer)`, run once the starting weights are in place (e.g. to
    # record reference log-probabilities), and `train_metrics(reports)`, the job's own
    # metrics from the loss reports summed over the logging window.


class Trainer:
    def __init__(self, cfg: RunConfig, job: Job, model_cfg, stop: StopRequest):
        self.cfg, self.job, self.model_cfg, self.stop = cfg, job, model_cfg, stop
        self.started = time.perf_counter()
        self.state = TrainState()
        self.exit_code, self.reason = 0, "finished"
        self.last_eval_iteration: Optional[int] = None
        self.last_skip_reason = ""

    # ------------------------------------------------------------------------------ build
    def build(self) -> None:
        from megatron_danube.models.builder import build_model_chunks, count_parameters
        from megatron_danube.models.config_builder import build_transformer_config
        from megatron_danube.runtime.distributed import initialize
        from megatron_danube.training.optim import build_optimizer
        from megatron_danube.training.step import wrap_with_ddp

        cfg = self.cfg
        self.rt = initialize(
            self.model_cfg,
            cfg.parallel,
            seed=cfg.train.seed,
            spec=cfg.model.spec,
            device=cfg.train.device,
            seq_length=self.job.max_seq_length,
            checked=getattr(self.job, "checked_layout", None),
        )
        self.lock = RunDirLock(cfg.run_dir, self.rt.is_main)
        if self.rt.is_main:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        self.job.setup(self.rt, self.rt.is_main)
        dist.barrier()
        config = build_transformer_config(
            self.model_cfg,
            cfg.parallel,
            spec=self.rt.spec,
            device_type=self.rt.device.type,
            precision=cfg.precision,
            recompute=cfg.recompute,
            **self.job.transformer_overrides,
        )
        chunks = build_model_chunks(self.model_cfg, config, self.rt.spec, self.rt.device)
        self.chunks = wrap_with_ddp(
            chunks,
            config,
            use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
            overlap_grad_reduce=cfg.optim.overlap_grad_reduce,
        )
        self.optimizer, self.scheduler = build_optimizer(
            cfg.optim, self.chunks, config, self.job.total_tokens
        )
        self.checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint)
        self.metrics = MetricsWriter(cfg.run_dir, self.rt.is_main, cfg.logging.tensorboard)
        logger.info(
            "model %s: %s parameters (%s on rank 0), spec=%s, device=%s, TP=%d PP=%d VPP=%d DP=%d",
            self.model_cfg.name,
            f"{self.model_cfg.num_parameters():,}",
            f"{count_parameters(self.chunks):,}",
            self.rt.spec,
            self.rt.device.type,
            cfg.parallel.tensor_parallel,
            cfg.parallel.pipeline_parallel,
            cfg.parallel.virtual_pipeline,
            self.rt.data_parallel,
        )

    def resume(self) -> None:
        cfg = self.cfg
        from megatron_danube.training.checkpointing import resolve_checkpoint

        own = self.checkpoints.latest()
        source = own or cfg.checkpoint.load
        if not source:
            return
        if not own:  # a run directory names its latest intact checkpoint
            source = resolve_checkpoint(source, "checkpoint.load")
        saved = self.checkpoints.load(
            source,
            self.chunks,
            self.optimizer,
            load_optimizer=bool(own) or cfg.checkpoint.load_optimizer,
            verify=not own,
            before_load=lambda state: resume_checks.check(
                state, self.train_state(), cfg.checkpoint.allow_changes, own=bool(own)
            ),
        )
        if own:  # continuing this run; a foreign checkpoint only provides the weights
            names = [f.name for f in dataclasses.fields(TrainState)]
            self.state = TrainState(**{k: saved[k] for k in names if k in saved})
            self.checkpoints.last_saved_iteration = self.state.iteration
        if self.state.consumed_tokens:
            self.scheduler.step(increment=self.state.consumed_tokens)
        self.metrics.truncate_after(self.state.iteration)
        if own:
            logger.info(
                "resumed from %s at iteration %d, %s tokens",
                source,
                self.state.iteration,
                f"{self.state.consumed_tokens:,}",
            )
        else:
            logger.info(
                "starting from the weights of %s%s",
                source,
                " and its optimizer state" if cfg.checkpoint.load_optimizer else "",
            )

    # ------------------------------------------------------------------------------ loop
    def train(self) -> int:
        from megatron_danube.training.step import train_step

        s, window, throughput = self.state, StepWindow(), Throughput()
        t_start, tokens_at_start, steps = time.perf_counter(), s.consumed_tokens, 0
        if hasattr(self.job, "after_resume"):
            self.job.after_resume(self)
        if s.consumed_tokens >= self.job.total_tokens:
            self.reason = (
                f"this run finished earlier ({self.cfg.run_dir}); nothing to do. To train "
                f"again, choose a new run_dir (or remove {self.cfg.run_dir})"
            )
            return self.exit_code
        if self.cfg.logging.eval_at_start and s.iteration == 0:
            self.evaluate()
        while s.consumed_tokens < self.job.total_tokens:
            if self.stop.agreed(self.rt.device):
                self.reason = "signal received: saved at a step boundary"
                break
            batch = self.job.train_batch(s)
            result = train_step(
                self.chunks,
                self.optimizer,
                batch.iterators,
                num_microbatches=batch.num_microbatches,
                seq_length=batch.seq_length,
                micro_batch_size=batch.micro_batch_size,
                forward_step_func=self.job.forward_step,
                report_sizes=self.job.report_sizes,
                loss_of=self.job.loss,
            )
            self.advance(batch, result, window, throughput)
            steps += 1
            if steps == 1 and self.rt.spec == "te":
                from megatron_danube.models.te_support import log_attention_backend

                log_attention_backend(logger)
            self.checkpoints.maybe_finalize()
            if s.iteration % self.cfg.logging.log_interval == 0:
                elapsed = time.perf_counter() - t_start
                self.log_step(
                    batch, window, throughput, elapsed, s.consumed_tokens - tokens_at_start
                )
            if self.cfg.logging.eval_interval and s.iteration % self.cfg.logging.eval_interval == 0:
                self.evaluate()
            self.reason = self.stop_reason(steps)
            if self.reason:
                break
            self.checkpoints.save_if_due(s.iteration, self.chunks, self.optimizer, self.train_state)
        else:
            self.reason = "finished"
            self.evaluate(final=True)
        self.checkpoints.save_if_due(
            s.iteration, self.chunks, self.optimizer, self.train_state, final=True
        )
        return self.exit_code

    def advance(self, batch: StepBatch, result: dict, window, throughput) -> None:
        s = self.state
        s.iteration += 1
        s.consumed_tokens += batch.tokens
        self.scheduler.step(increment=batch.tokens)
        throughput.add(batch.tokens, batch.flops)
        window.add(result["loss"], result["grad_norm"], result["reports"])
        if result["skipped"]:
            s.skipped_steps += 1
            s.bad_steps_in_row += 1
            self.last_skip_reason = result.get("skip_reason", "unknown")
            logger.warning(
                "iteration %d skipped: %s (loss %s)",
                s.iteration,
                self.last_skip_reason,
                result["loss"],
            )
        else:
            s.bad_steps_in_row = 0

    def stop_reason(self, steps_this_run: int) -> Optional[str]:
        s, train = self.state, self.cfg.train
        if s.bad_steps_in_row >= train.max_bad_steps:
            self.exit_code = 1
            return f"{s.bad_steps_in_row} skipped steps in a row (last: {self.last_skip_reason})"
        if train.exit_after_steps and steps_this_run >= train.exit_after_steps:
            return f"exit_after_steps={train.exit_after_steps}"
        return None

    # ------------------------------------------------------------------------------ records
    def train_state(self) -> dict:
        return dict(
            dataclasses.asdict(self.state),
            model=dataclasses.asdict(self.model_cfg),
            schedule=resume_checks.schedule_of(self.cfg),
            tokenizer=self.cfg.data.tokenizer,
            tokenizer_type=self.cfg.data.tokenizer_type,
            inputs=self.job.inputs,
            **self.job.state_extra(self.state),
        )

    def log_step(self, batch, window, throughput, elapsed: float, done_tokens: int) -> None:
        from megatron_danube.training.metrics import step_record

        s = self.state
        record = step_record(
            s.iteration,
            s.consumed_tokens,
            batch.labels,
            window,
            throughput,
            lr=self.optimizer.param_groups[0]["lr"],
            skipped_steps=s.skipped_steps,
            world_size=self.rt.world_size,
            peak_tflops=self.peak_tflops(),
            eta_s=elapsed / max(done_tokens, 1) * (self.job.total_tokens - s.consumed_tokens),
        )
        if hasattr(self.job, "train_metrics") and window.reports:
            record.update(self.job.train_metrics(window.reports))
        self.metrics.write(record, s.iteration)
        window.reset()
        throughput.reset()

    def peak_tflops(self) -> Optional[float]:
        from megatron_danube.training.metrics import H100_BF16_DENSE_TFLOPS

        if self.cfg.logging.peak_tflops:
            return self.cfg.logging.peak_tflops
        return H100_BF16_DENSE_TFLOPS if self.rt.device.type == "cuda" else None

    def forward_only(self, batches: List[StepBatch], forward_step, report_sizes) -> dict:
        """The loss function's reports summed over `batches`, the model in eval mode, no grads."""
        from megatron_danube.training.step import forward_backward

        totals = None
        for chunk in self.chunks:
            chunk.eval()
        with torch.no_grad():
            for b in batches:
                reports = forward_backward(
                    self.chunks,
                    b.iterators,
                    num_microbatches=b.num_microbatches,
                    seq_length=b.seq_length,
                    micro_batch_size=b.micro_batch_size,
                    forward_only=True,
                    forward_step_func=forward_step,
                    report_sizes=report_sizes,
                )
                totals = (
                    reports if totals is None else {k: totals[k] + v for k, v in reports.items()}
                )
        for chunk in self.chunks:
            chunk.train()
        return totals

    def evaluate(self, final: bool = False) -> None:
        if final and self.last_eval_iteration == self.state.iteration:
            return  # the interval's validation just ran at this very step
        batches = self.job.eval_batches(self.state)
        if not batches:
            return
        self.last_eval_iteration = self.state.iteration
        totals = self.forward_only(batches, self.job.forward_step, self.job.report_sizes)
        record = {"iteration": self.state.iteration, "consumed_tokens": self.state.consumed_tokens}
        record.update(self.job.eval_metrics(totals))
        self.metrics.write(record, self.state.iteration, prefix="valid")
        logger.info(
            "%s at iter %d: %s",
            "final validation"
            if final or self.state.consumed_tokens >= self.job.total_tokens
            else "validation",
            self.state.iteration,
            ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("val_", "eval_"))),
        )

    def close(self) -> None:
        from megatron_danube.runtime.distributed import shutdown

        self.checkpoints.close()
        self.metrics.close()
        minutes, seconds = divmod(round(time.perf_counter() - self.started), 60)
        logger.info(
            "stopped at iteration %d (%s tokens): %s (%d min %d s in all)",
            self.state.iteration,
            f"{self.state.consumed_tokens:,}",
            self.reason,
            minutes,
            seconds,
        )
        self.lock.release()
        shutdown()


def run(cfg: RunConfig, job: Job, model_cfg, stop: StopRequest) -> int:
    """Build, resume, train, close; the exit code (0, or 1 after repeated non-finite steps)."""
    trainer = Trainer(cfg, job, model_cfg, stop)
    trainer.build()
    try:
        trainer.resume()
        return trainer.train()
    finally:
        trainer.close()
