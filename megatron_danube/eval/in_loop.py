"""The trainer's task-scoring hook: the config's `eval` tasks scored with the model being
trained, at its layout, as `eval/<task>/<metric>` numbers.

Checked once before training (lm-eval installed, every task known, its data readable offline).
Scoring leaves training as it was: the model goes back to train mode and the random
generators (Python, NumPy, torch, megatron's tracker) to their state, so a run with task
scoring takes the same steps as one without it and resumes the same way.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from megatron_danube.errors import DanubeConfigError
from megatron_danube.eval import tasks as task_checks

logger = logging.getLogger(__name__)


@dataclass
class ModelInTraining:
    """What `DanubeLM` reads of a model: this rank's chunks, its config, its tokenizer."""

    chunks: List[torch.nn.Module]
    model: object
    tokenizer: object


class TaskScoring:
    """Call with (chunks, plan) -> {"eval/<task>/<metric>": value} (empty off local rank 0)."""

    def __init__(self, section, run_dir: str):
        self.section = section
        self.names = task_checks.split_names(section.tasks)
        self.include = task_checks.with_demo_tasks(
            self.names, section.include_paths, None, default_dir=os.path.join(run_dir, "eval-tasks")
        )
        self.manager = None

    @classmethod
    def checked(cls, section, run_dir: str) -> TaskScoring:
        """The hook for `section`, its tasks and their data found now; one-line errors."""
        if section.interval < 0:
            raise DanubeConfigError(f"eval.interval={section.interval}; it must be >= 0")
        if section.batch_size < 1:
            raise DanubeConfigError(f"eval.batch_size={section.batch_size}; it must be >= 1")
        if section.limit is not None and section.limit < 1:
            raise DanubeConfigError(f"eval.limit={section.limit}; give >= 1, or null for all")
        scoring = cls(section, run_dir)
        scoring.manager = task_checks.task_manager(scoring.include)
        task_checks.load_tasks(scoring.names, scoring.manager)
        return scoring

    def __call__(self, chunks, plan) -> Dict[str, float]:
        from megatron_danube.eval.lm import DanubeLM
        from megatron_danube.eval.results import evaluate, flat_metrics

        saved = _random_state()
        try:
            lm = DanubeLM.around(
                ModelInTraining(chunks, plan.model, plan.tokenizer),
                batch_size=self.section.batch_size,
            )
            results = evaluate(
                lm,
                self.names,
                self.manager,
                num_fewshot=self.section.num_fewshot,
                limit=self.section.limit,
                bootstrap_iters=0,  # standard errors are not logged
                reseed=False,
            )
        finally:
            _restore_random_state(saved)
        return flat_metrics(results) if results else {}


def _random_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _restore_random_state(saved: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(saved["python"])
    np.random.set_state(saved["numpy"])
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] is not None:
        torch.cuda.set_rng_state(saved["cuda"])
    get_cuda_rng_tracker().set_states(saved["tracker"])
