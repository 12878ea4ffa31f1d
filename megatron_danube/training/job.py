"""The contract between the trainer and a training job: every hook declared, with its default.

A job says what differs between pretraining, SFT, DPO and the jobs after them: its data and
batches, the forward step and its loss reports, metrics, the schedule's length, and what it
does to the model before megatron's DDP wraps it. It reads the run's frozen `Plan`
(training/plan.py) and never the trainer: what it may use of a running run comes as a
`RunContext`. New jobs subclass `Job` and register in `training/jobs/registry.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Iterator, List

import torch

from megatron_danube.training.plan import Plan


@dataclass
class TrainState:
    """Where a run is; recorded in every checkpoint and restored on resume."""

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


ForwardOnly = Callable[[List[StepBatch], Callable, Dict[str, int]], Dict[str, torch.Tensor]]


@dataclass(frozen=True)
class RunContext:
    """What a job may use of the running run (after the starting weights are in place)."""

    iteration: int
    """The step the run continues from (0: a fresh start)."""
    is_main: bool
    """Whether this is rank 0, which writes the run's shared files."""
    forward_only: ForwardOnly
    """(batches, forward step, report sizes) -> the loss reports summed over the batches,
    the model in eval mode and without gradients."""


class Job:
    """A training job: subclass it, override what differs, register it by name."""

    name: ClassVar[str] = ""
    """The `job:` value of the configs that run it."""
    forward_step: Callable
    """megatron forward-step function: (data_iterator, model) -> (output, loss_func)."""
    report_sizes: Dict[str, int]
    """Names and lengths of the loss function's reports."""
    transformer_overrides: ClassVar[Dict[str, object]] = {}
    """TransformerConfig fields the job needs, e.g. `calculate_per_token_loss`."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.cfg = plan.config

    # ---------------------------------------------------------------------------- schedule
    @property
    def total_tokens(self) -> int:
        """Length of the schedule, in tokens (a chat job knows it once its data is read)."""
        return self.cfg.train.train_tokens

    # ---------------------------------------------------------------------------- model
    def transform_model(self, chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
        """The model chunks before DDP wraps them: add adapters, freeze weights. Parameters
        with `requires_grad=False` afterwards do not train and get no optimizer state."""
        return chunks

    def absent_from_start(self, name: str) -> bool:
        """Whether parameter `name` is one the start checkpoint cannot hold (it keeps its
        initial value; e.g. LoRA adapters)."""
        return False

    def checkpoint_holds(self, name: str) -> bool:
        """Whether model state `name` is saved in the run's own checkpoints. What is not (a
        LoRA run's frozen base) is read from the start checkpoint on every resume."""
        return True

    @property
    def start_is_base(self) -> bool:
        """Whether every resume reads the start checkpoint first (the run's own checkpoints
        leave part of the model out: see `checkpoint_holds`)."""
        return False

    # ---------------------------------------------------------------------------- data
    def setup(self, rt) -> None:
        """Prepare data; called once on every rank after the process group exists."""

    def train_batch(self, state: TrainState) -> StepBatch:
        raise NotImplementedError(f"job {self.name} defines no train_batch")

    def eval_batches(self, state: TrainState) -> List[StepBatch]:
        """The validation batches (empty: nothing to validate on)."""
        return []

    # ---------------------------------------------------------------------------- hooks
    def after_resume(self, run: RunContext) -> None:
        """Once the starting weights are in place, before the first step (e.g. DPO records its
        reference log-probabilities here)."""

    # ---------------------------------------------------------------------------- metrics
    def loss(self, reports: Dict[str, torch.Tensor]) -> float:
        raise NotImplementedError(f"job {self.name} defines no loss")

    def train_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """The job's own metrics from the loss reports summed over the logging window."""
        return {}

    def eval_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Validation metrics from the reports summed over `eval_batches`."""
        return {}

    def state_extra(self, state: TrainState) -> Dict[str, object]:
        """What the job records in each checkpoint's train state."""
        return {}

    def schedule(self) -> Dict[str, object]:
        """The settings that decide which sample each step reads: resuming the run's own
        checkpoints with other values is refused unless `checkpoint.allow_changes` names them."""
        cfg = self.cfg
        return {
            "job": self.name,
            "train.train_tokens": cfg.train.train_tokens,
            "train.global_batch_tokens": cfg.train.global_batch_tokens,
            "data.seed": cfg.data.seed,
        }

    def restored(self, saved: Dict[str, object]) -> None:
        """Called with the train state of the run's own checkpoint it resumes from."""
