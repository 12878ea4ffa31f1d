"""Training jobs by name: what `job:` in a config may say, and how each is planned and made.

A job module registers a `JobSpec` when it is imported; the built-in ones are imported on the
first lookup. Adding a job: subclass `training.job.Job`, write its `plan(cfg) -> Plan` (the
shared checks are in `training/preflight.py`), call `register_job(JobSpec(...))` at the end of
its module, and list the module in `BUILTIN_JOB_MODULES` (or import it before training).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal

from megatron_danube.errors import DanubeConfigError

BUILTIN_JOB_MODULES = (
    "megatron_danube.training.jobs.pretrain",
    "megatron_danube.training.jobs.sft",
    "megatron_danube.training.jobs.dpo",
)


@dataclass(frozen=True)
class JobSpec:
    """A registered job."""

    name: str
    """The `job:` value that selects it."""
    family: Literal["pretrain", "finetune"]
    """Which alias command runs it (`danube-pretrain` or `danube-finetune`); `danube-train`
    runs every job."""
    plan: Callable
    """(RunConfig) -> Plan: every check and derived value, before any process group exists."""
    make: Callable
    """(Plan) -> Job: the job object the trainer drives."""
    summary: str
    """One line for `danube-train --help` and error messages."""


_JOBS: Dict[str, JobSpec] = {}


def register_job(spec: JobSpec) -> JobSpec:
    """Make `spec` available by its name; a second job with one name is a programming error."""
    if spec.name in _JOBS and _JOBS[spec.name] is not spec:
        raise ValueError(f"a job named {spec.name!r} is registered already")
    _JOBS[spec.name] = spec
    return spec


def _load_builtin() -> None:
    for module in BUILTIN_JOB_MODULES:
        importlib.import_module(module)


def job_names() -> List[str]:
    _load_builtin()
    return list(_JOBS)


def get_job(name: str) -> JobSpec:
    """The job called `name`, or a one-line error with the known names."""
    _load_builtin()
    if name in _JOBS:
        return _JOBS[name]
    close = difflib.get_close_matches(str(name), list(_JOBS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DanubeConfigError(f"job={name!r}; {hint}choose one of {', '.join(_JOBS)}")
