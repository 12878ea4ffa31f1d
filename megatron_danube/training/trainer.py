"""One training loop for every job: build, resume, then step, log, evaluate, save, stop.

The run's frozen `Plan` (training/preflight.py) says what was decided; what differs between
pretraining, SFT and DPO (data and batches, the forward step and its loss reports, metrics,
the schedule's length, changes to the model before DDP) comes in as a `Job`
(training/job.py); the loop itself is `Trainer.train`. Checkpoint intervals are the
checkpointer's business, signals are handled from process start (`StopRequest`), and every
rank takes each decision together.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_danube.config import save_config
from megatron_danube.runtime.stop import StopRequest
from megatron_danube.training import resume_checks
from megatron_danube.training.checkpointing import CheckpointManager
from megatron_danube.training.job import Job, RunContext, StepBatch, TrainState
from megatron_danube.training.metrics import MetricsWriter, StepWindow, Throughput
from megatron_danube.training.plan import Plan, StartPoint
from megatron_danube.training.run_lock import RunDirLock

# (the plan's start point) -> None: turns `start.convert_from_hf` into `start.checkpoint`;
# given by the command that runs the trainer (conversion is a tool above training).
StartConverter = Callable[[StartPoint], None]
# (model chunks, plan) -> {"eval/<task>/<metric>": value}: the config's `eval` tasks scored on
# the model being trained; given by the command (evaluation is a tool above training).
TaskScorer = Callable[[List[torch.nn.Module], Plan], Dict[str, float]]

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(
        self,
        plan: Plan,
        job: Job,
        stop: StopRequest,
        convert_start: Optional[StartConverter] = None,
        score_tasks: Optional[TaskScorer] = None,
    ):
        self.plan, self.cfg, self.job, self.stop = plan, plan.config, job, stop
        self.model_cfg = plan.model
        self.convert_start, self.task_scorer = convert_start, score_tasks
        self.last_tasks_iteration: Optional[int] = None
        self.started = time.perf_counter()
        self.state = TrainState()
        self.exit_code, self.reason = 0, None
        self.last_eval_iteration: Optional[int] = None
        self.last_skip_reason = ""

    # ------------------------------------------------------------------------------ build
    def build(self) -> None:
        from megatron_danube.models.builder import count_parameters
        from megatron_danube.runtime.distributed import initialize
        from megatron_danube.training.model_build import build_model, wrap_for_training

        cfg, plan = self.cfg, self.plan
        self.rt = initialize(
            plan.model,
            cfg.parallel,
            seed=cfg.train.seed,
            spec=cfg.model.spec,
            device=cfg.train.device,
            timeout_minutes=cfg.train.distributed_timeout_minutes,
            rendezvous_timeout_s=cfg.train.rendezvous_timeout_s,
            seq_length=plan.max_seq_length,
            checked=plan.layout,
        )
        self.lock = RunDirLock(cfg.run_dir, self.rt.is_main)
        if self.rt.is_main:
            save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"), header=plan.summary())
        logger.info("plan: %s", plan.summary())
        self._prepare_start()
        self.job.setup(self.rt)
        dist.barrier()
        config, chunks = build_model(
            plan.model,
            layout=cfg.parallel,
            spec=self.rt.spec,
            device=self.rt.device,
            precision=cfg.precision,
            recompute=cfg.recompute,
            overrides=self.job.transformer_overrides,
            pre_wrap=[self.job.transform_model],
        )
        model = wrap_for_training(config, chunks, cfg.optim, self.job.total_tokens)
        self.chunks, self.optimizer, self.scheduler = model.chunks, model.optimizer, model.scheduler
        self.checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint, self.job.checkpoint_holds)
        self.metrics = MetricsWriter(cfg.run_dir, self.rt.is_main, cfg.logging.tensorboard)
        trainable = sum(p.numel() for c in self.chunks for p in c.parameters() if p.requires_grad)
        logger.info(
            "model %s: %s parameters (%s on rank 0, %s of them trained), spec=%s, device=%s, "
            "TP=%d PP=%d VPP=%d DP=%d",
            self.model_cfg.name,
            f"{self.model_cfg.num_parameters():,}",
            f"{count_parameters(self.chunks):,}",
            f"{trainable:,}",
            self.rt.spec,
            self.rt.device.type,
            cfg.parallel.tensor_parallel,
            cfg.parallel.pipeline_parallel,
            cfg.parallel.virtual_pipeline,
            self.rt.data_parallel,
        )

    def _prepare_start(self) -> None:
        """Rank 0 converts an HF start once; every rank learns of a failure in one line."""
        from megatron_danube.errors import DanubeConfigError
        from megatron_danube.runtime.distributed import raise_rank0_problem

        start = self.plan.start
        if self.plan.resumes or not start.convert_from_hf:
            return
        problem = None
        if self.rt.is_main:
            try:
                if self.convert_start is None:
                    raise DanubeConfigError(
                        f"checkpoint.load={start.convert_from_hf} is an HF model directory; "
                        f"convert it with danube-convert --to mcore and load the result"
                    )
                self.convert_start(start)
            except DanubeConfigError as exc:
                problem = str(exc)
        raise_rank0_problem(problem)

    def resume(self) -> None:
        """Weights from the start point and/or the run's own latest checkpoint (both, where
        the run's checkpoints hold only what trains), then the schedule where it was."""
        own = self.checkpoints.latest()
        if own is None or self.job.start_is_base:
            self._load_start(resuming=own is not None)
        if own:
            self._load_own(own)
        if self.state.consumed_tokens:
            self.scheduler.step(increment=self.state.consumed_tokens)
        self.metrics.truncate_after(self.state.iteration)

    def _load_start(self, resuming: bool) -> None:
        from megatron_danube.training.checkpoint_format import resolve_checkpoint

        start = self.plan.start
        if not start.checkpoint:
            return
        source = resolve_checkpoint(start.checkpoint, "checkpoint.load", verify=start.verify)
        load_optimizer = start.load_optimizer and not resuming
        self.checkpoints.load(
            source,
            self.chunks,
            self.optimizer,
            load_optimizer=load_optimizer,
            verify=False,  # resolve_checkpoint() verified what it named
            before_load=lambda saved: self._check_saved(saved, own=False),
            absent=self.job.absent_from_start,
        )
        logger.info(
            "%s the weights of %s%s",
            "base: " if resuming else "starting from",
            source,
            " and its optimizer state" if load_optimizer else "",
        )

    def _load_own(self, own: str) -> None:
        saved = self.checkpoints.load(
            own,
            self.chunks,
            self.optimizer,
            load_optimizer=True,
            verify=False,  # latest() verified what it named
            before_load=lambda saved: self._check_saved(saved, own=True),
            absent=lambda name: not self.job.checkpoint_holds(name),
        )
        names = [f.name for f in dataclasses.fields(TrainState)]
        self.state = TrainState(**{k: saved[k] for k in names if k in saved})
        self.checkpoints.last_saved_iteration = self.state.iteration
        logger.info(
            "resumed from %s at iteration %d, %s tokens",
            own,
            self.state.iteration,
            f"{self.state.consumed_tokens:,}",
        )

    def _check_saved(self, saved: dict, *, own: bool) -> None:
        """Before any tensor is read: the job learns what its own checkpoint recorded, then
        the checkpoint is compared with this run (model, and for its own the schedule)."""
        if own:
            self.job.restored(saved)
        resume_checks.check(saved, self.train_state(), self.cfg.checkpoint.allow_changes, own=own)

    # ------------------------------------------------------------------------------ loop
    def train(self) -> int:
        from megatron_danube.training.step import train_step

        s, window, throughput = self.state, StepWindow(), Throughput()
        t_start, tokens_at_start, steps = time.perf_counter(), s.consumed_tokens, 0
        self.job.after_resume(
            RunContext(s.iteration, self.rt.is_main, forward_only=self.forward_only)
        )
        if s.consumed_tokens >= self.job.total_tokens:
            self.reason = (
                f"this run finished earlier ({self.cfg.run_dir}); nothing to do. To train "
                f"again, choose a new run_dir (or remove {self.cfg.run_dir})"
            )
            return self.exit_code
        if self.cfg.logging.eval_at_start and s.iteration == 0:
            self.evaluate()
        while s.consumed_tokens < self.job.total_tokens:
            signalled = self.stop.ranks_signalled(self.rt.device)
            if signalled:
                name = signal.Signals(self.stop.signal).name if self.stop.signal else "a signal"
                self.reason = (
                    f"signal received: saved at a step boundary ({name} reached {signalled} of "
                    f"{self.rt.world_size} rank(s))"
                )
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
            if self.cfg.eval.interval and s.iteration % self.cfg.eval.interval == 0:
                self.score_tasks()
            self.reason = self.stop_reason(steps)
            if self.reason:
                break
            self.checkpoints.save_if_due(s.iteration, self.chunks, self.optimizer, self.train_state)
        else:
            self.reason = "finished"
            self.evaluate(final=True)
            self.score_tasks()
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
            schedule=self.job.schedule(),
            tokenizer=self.cfg.data.tokenizer,
            tokenizer_type=self.cfg.data.tokenizer_type,
            inputs=dict(self.plan.inputs),
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
        if window.reports:
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

    def score_tasks(self) -> None:
        """The config's lm-eval tasks on the model as it is now (once per iteration); a
        failure is one warning and training goes on."""
        it = self.state.iteration
        if self.task_scorer is None or self.last_tasks_iteration == it:
            return
        self.last_tasks_iteration = it
        try:
            scores = self.task_scorer(self.chunks, self.plan)
        except Exception as exc:  # evaluation must never cost the run
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            logger.warning(
                "task evaluation at iteration %d failed, training goes on: %s: %s",
                it,
                type(exc).__name__,
                first_line,
            )
            return
        if scores:
            record = {"iteration": it, "consumed_tokens": self.state.consumed_tokens, **scores}
            self.metrics.write(record, it, prefix=None)
            logger.info(
                "tasks at iter %d: %s", it, ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
            )

    def close(self) -> None:
        from megatron_danube.runtime.distributed import shutdown

        self.checkpoints.close()
        self.metrics.close()
        minutes, seconds = divmod(round(time.perf_counter() - self.started), 60)
        if self.reason is not None:  # None: an error ended start-up or a step; it is reported
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


def run(
    plan: Plan,
    stop: StopRequest,
    convert_start: Optional[StartConverter] = None,
    score_tasks: Optional[TaskScorer] = None,
) -> int:
    """Build, resume, train, close the plan's job; the exit code (0, or 1 after repeated
    non-finite steps)."""
    from megatron_danube.training.jobs.registry import get_job

    trainer = Trainer(plan, get_job(plan.job).make(plan), stop, convert_start, score_tasks)
    trainer.build()
    try:
        trainer.resume()
        return trainer.train()
    except RuntimeError as exc:
        from megatron_danube.runtime.rendezvous import lost_peer

        lost = lost_peer(exc, trainer.rt.rank, plan.config.train.distributed_timeout_minutes)
        if lost is None:
            raise
        raise lost from None
    finally:
        trainer.close()
