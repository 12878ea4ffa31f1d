"""Which lm-eval tasks a run asks for, found and their data loaded offline before any model
work: an unknown task or one whose data is not on this machine is a one-line error.

Evaluation never downloads: `HF_DATASETS_OFFLINE` and `HF_HUB_OFFLINE` are set (a value the
user set is kept), so hub tasks read the HF datasets cache and the project's tasks read local
JSONL. The pydoc demo tasks (`demo_tasks.py`) are written on first use.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence

from megatron_danube.errors import DanubeConfigError

logger = logging.getLogger(__name__)

# No download at evaluation time; and no progress bars from `datasets` around one-line errors.
OFFLINE = {
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
DEFAULT_DEMO_DIR = os.path.join("runs", "demo-eval-tasks")


def go_offline() -> None:
    for name, value in OFFLINE.items():
        os.environ.setdefault(name, value)


def split_names(tasks) -> List[str]:
    """`a,b` or a list -> the task names, empty entries dropped."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    return [name.strip() for name in items if name and name.strip()]


def task_manager(include_paths: Sequence[str] = ()):
    """lm-eval's TaskManager over its own tasks and `include_paths`."""
    go_offline()
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise DanubeConfigError('evaluation needs lm-eval; pip install -e ".[eval]"') from None
    for path in include_paths:
        if not os.path.isdir(path):
            raise DanubeConfigError(f"--include-path {path}: no such directory")
    return TaskManager(include_path=list(include_paths) or None)


def with_demo_tasks(
    names: Sequence[str],
    include_paths: Sequence[str],
    demo_dir: Optional[str],
    default_dir: str = DEFAULT_DEMO_DIR,
):
    """`include_paths` plus the demo tasks' folder (`demo_dir`, else `default_dir`), written
    there first where a demo task is asked for or `demo_dir` is given."""
    from megatron_danube.eval.demo_tasks import DEMO_TASKS, write_demo_tasks

    if demo_dir is None and not set(names) & set(DEMO_TASKS):
        return list(include_paths)
    folder = demo_dir or default_dir
    write_demo_tasks(folder)
    return list(include_paths) + [folder]


def load_tasks(names: Sequence[str], manager) -> Dict[str, object]:
    """Each task (or group) loaded with its data; a one-line error naming the first task that
    is unknown or whose data cannot be read here."""
    if not names:
        raise DanubeConfigError("no task given; pass --tasks NAME[,NAME...] (eval.tasks)")
    from lm_eval.tasks import get_task_dict

    go_offline()
    known = set(manager.all_tasks)
    loaded: Dict[str, object] = {}
    for name in names:
        if name not in known:
            raise DanubeConfigError(_unknown(name, manager.all_tasks))
        try:
            loaded.update(get_task_dict([name], manager))
        except Exception as exc:  # datasets raises many kinds; every one means "not here"
            raise DanubeConfigError(_no_data(name, exc)) from None
    return loaded


def _unknown(name: str, known: List[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (
        f"unknown task {name!r}; {hint}tasks come from lm-eval and from --include-path "
        f"folders (lm-eval --tasks list shows them)"
    )


def _no_data(name: str, exc: Exception) -> str:
    import datasets

    detail = (str(exc).strip().splitlines() or [""])[0][:300]
    return (
        f"task {name}: its data cannot be loaded offline ({type(exc).__name__}: {detail}); "
        f"looked in the task's local files and the HF datasets cache "
        f"{datasets.config.HF_DATASETS_CACHE}; put the data there (load it once online) or "
        f"point the task's YAML at local files"
    )
