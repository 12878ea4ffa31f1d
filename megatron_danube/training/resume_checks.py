"""What a resume may not change silently: the model, and (for the run's own checkpoints) the
token schedule (each job's `schedule()`). A difference is a one-line error naming the field,
unless the run lists it in `checkpoint.allow_changes` because the change is deliberate."""

from __future__ import annotations

import os
from typing import List

from megatron_danube.errors import DanubeConfigError

# Settings that name files: two spellings of one file are one setting (what the files hold is
# compared by content in training/run_inputs.py).
_PATH_LISTS = ("chat.train",)


def _same(key: str, a, b) -> bool:
    if key in _PATH_LISTS and isinstance(a, list) and isinstance(b, list):
        return [os.path.realpath(p) for p in a] == [os.path.realpath(p) for p in b]
    return a == b


def _differences(saved: dict, current: dict, prefix: str = ""):
    for key in sorted(set(saved) | set(current)):
        if key in ("name",):  # a preset's label, not a property of the weights
            continue
        if not _same(key, saved.get(key), current.get(key)):
            yield f"{prefix}{key}", saved.get(key), current.get(key)


def _as_now(schedule: dict) -> dict:
    """A schedule recorded by an earlier release, in today's keys (`chat.pack` was greedy
    packing or none), so a resume compares like with like."""
    schedule = dict(schedule)
    if "chat.pack" in schedule:
        schedule["chat.packing"] = "greedy" if schedule.pop("chat.pack") else "none"
    return schedule


def check(saved: dict, current: dict, allow_changes: List[str], *, own: bool) -> None:
    """Raise when `saved` (a checkpoint's train state) conflicts with this run's `current`."""
    allowed = set(allow_changes)
    changes = list(_differences(saved.get("model") or {}, current["model"], "model."))
    if own and "schedule" in saved:
        changes += list(_differences(_as_now(saved["schedule"]), current["schedule"]))
    for name, before, now in changes:
        if name in allowed or (name.startswith("model.") and "model" in allowed):
            continue
        raise DanubeConfigError(
            f"the checkpoint was written with {name}={before!r} but this run has {now!r}; "
            f"restore the setting, or add {name} to checkpoint.allow_changes to change it "
            f"on purpose"
        )
