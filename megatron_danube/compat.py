"""What differs between the megatron-core releases this package runs on: 0.16.1 to 0.19.x.

Every decision that depends on the installed megatron-core is made here, from its version
(`MCORE_VERSION`): a flag of `FEATURES` or a small function. Nothing else in the package compares
versions. The CPU patches each version needs are in `cpu_compat.py`, keyed on these flags.

What moved, by the release that moved it (each was hit by this package's tests):

* 0.17 (and Python >= 3.12 from here on): `dist_checkpointing.save` takes `async_strategy`,
  default "nvrx", which needs the separate nvidia-resiliency-ext package; megatron's own
  writer is "mcore", the only one 0.16 has. The writer's results-queue helper lost its
  underscore (`get_write_results_queue`), and the signal-immune start of that helper
  (training/checkpoint_writer.py) has to call it by its new name.
* 0.18: `OptimizerConfig` gains `grad_norm_skip_threshold` (default inf; the config loader
  accepts a field's own infinite default). On older releases the key is unknown, and the
  loader's error names the release (`key_added_in`).
* 0.19: the checkpoint's common (non-tensor) state is stored inside the torch_dist shards
  instead of `common.pt`, which 0.16 to 0.18 need to load anything: saves here add the
  `common.pt` those releases read (0.19 reads either). Saved optimizer parameter groups are
  matched to the current ones by `max_lr`, `min_lr` and the other per-group overrides too, so
  a resume with another `optim.lr` failed (`KeyError`): `align_param_groups` first gives the
  saved groups this run's schedule values, on every version alike. The gradient sync asks
  for `torch.cuda.current_stream()` on every step (patched for the CPU in cpu_compat).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import warnings
from typing import Optional, Tuple

from megatron_danube.errors import DanubeConfigError

logger = logging.getLogger(__name__)

Version = Tuple[int, int, int]

OLDEST: Version = (0, 16, 1)
"""The oldest megatron-core release supported (and tested)."""
NEWEST_MINOR: Tuple[int, int] = (0, 19)
"""The newest release line supported (and tested, at its newest patch release)."""
PIN = "megatron-core>=0.16.1,<0.20"

# Config keys that come from megatron-core's own dataclasses and appeared after the oldest
# supported release: on an older install they are unknown, and the error says which release.
NEWER_CONFIG_KEYS = {"optim.grad_norm_skip_threshold": "0.18"}


def key_added_in(key: str) -> Optional[str]:
    """The megatron-core release that added config `key`, where it is a newer one."""
    return NEWER_CONFIG_KEYS.get(key)


# The parameter-group keys megatron 0.16 matches saved groups by; later releases add the
# per-group schedule overrides (max_lr, min_lr, ...) to these.
STRUCTURAL_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")
SCHEDULE_GROUP_KEYS = ("max_lr", "min_lr")
LEGACY_COMMON_FILE = "common.pt"


def parse_version(text: str) -> Version:
    """'0.19.2', '0.17.0rc1', '0.20.0.dev0+abc' -> (major, minor, patch)."""
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", str(text))
    if not match:
        raise DanubeConfigError(f"cannot read megatron-core version {text!r}; expected X.Y.Z")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


def installed_version() -> str:
    """The installed megatron-core's version: its package metadata, else (a source checkout
    of Megatron-LM on the path) megatron.core.package_info."""
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        pass
    try:
        from megatron.core import package_info
    except ImportError:
        raise DanubeConfigError(f"megatron-core is not installed; pip install '{PIN}'") from None
    return package_info.__version__


@dataclasses.dataclass(frozen=True)
class Features:
    """What the installed megatron-core does differently, as the package needs to know it."""

    save_async_strategy: Optional[str]
    """`async_strategy` to pass to dist_checkpointing.save (None: no such parameter)."""
    writer_queue_helper: str
    """filesystem_async's function that spawns the writer's results-queue helper process."""
    common_state_in_shards: bool
    """Checkpoints keep their common state inside the shards (no common.pt of their own)."""
    reads_common_file: bool
    """Loading a checkpoint needs its common.pt."""
    grad_sync_uses_cuda_stream: bool
    """The gradient sync calls torch.cuda.current_stream() whatever the configuration."""
    # The optimizer-state behaviours that training/optimizer_state_repairs.py works around,
    # one flag per repair (each found with torch's Adam/SGD, i.e. without TE or apex).
    load_shares_adam_step: bool
    """After DistributedOptimizer.load_state_dict, torch's Adam can hold one `step` tensor
    shared by all parameters: each param's update advances it, so bias correction is wrong."""
    reshardable_load_lacks_param_step: bool
    """DistributedOptimizer, loading the fully-reshardable format with torch's Adam, fails
    copying the parameter state (`KeyError: 'step'`: the format stores no per-param step)."""
    fresh_dist_optimizer_has_no_state: bool
    """A DistributedOptimizer that never stepped has no Adam state to load into: megatron makes
    one (dummy values) only for the FSDP format (else `assert len(steps) == 1`)."""
    empty_optimizer_state_unsaveable: bool
    """DistributedOptimizer cannot describe an empty state for a save (`assert len(steps) ==
    1`), which a run whose every step so far was skipped still has."""
    sgd_has_no_state_initialiser: bool
    """megatron's SGD optimizers get no `init_state_fn` (None), which loading their
    checkpoint calls."""
    drops_zero_adam_step: bool
    """The non-distributed optimizer saves Adam's shared step only when truthy (`if step:`):
    a state saved at step 0 comes back without one, and torch's Adam fails (`KeyError`)."""


def features_for(version: Version) -> Features:
    """The feature flags of a megatron-core version (the one mapping from version to code)."""
    v16, v17, v19 = version >= (0, 16, 0), version >= (0, 17, 0), version >= (0, 19, 0)
    return Features(
        save_async_strategy="mcore" if v17 else None,
        writer_queue_helper="get_write_results_queue" if v17 else "_get_write_results_queue",
        common_state_in_shards=v19,
        reads_common_file=not v19,
        grad_sync_uses_cuda_stream=v19,
        # Found on 0.16.1; no later supported release is known to have changed them, and
        # each repair is harmless where its behaviour is absent: on from 0.16 on.
        load_shares_adam_step=v16,
        reshardable_load_lacks_param_step=v16,
        fresh_dist_optimizer_has_no_state=v16,
        empty_optimizer_state_unsaveable=v16,
        sgd_has_no_state_initialiser=v16,
        drops_zero_adam_step=v16,
    )


MCORE_VERSION_STRING = installed_version()
MCORE_VERSION: Version = parse_version(MCORE_VERSION_STRING)
FEATURES = features_for(MCORE_VERSION)


def support_problem(version: Version = MCORE_VERSION) -> Optional[str]:
    """Why `version` is refused (one line), or None; a newer, untested one is only warned of."""
    text = ".".join(map(str, version))
    if version < OLDEST:
        return f"megatron-core {text} is older than this package supports; pip install '{PIN}'"
    if version[:2] > NEWEST_MINOR:
        logger.warning(
            "megatron-core %s is newer than the releases this package is tested with (%s)",
            text,
            PIN,
        )
    return None


def check_supported(version: Version = MCORE_VERSION) -> None:
    problem = support_problem(version)
    if problem:
        raise DanubeConfigError(problem)


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(sharded_state_dict: dict, path: str, *, async_save: bool = False, **kwargs):
    """dist_checkpointing.save with megatron's own writer, readable by every supported release.

    Returns the async request when `async_save` (the legacy common.pt is then written by one
    of its finalize functions, after megatron's own), else None.
    """
    from megatron.core import dist_checkpointing

    if FEATURES.save_async_strategy:
        kwargs["async_strategy"] = FEATURES.save_async_strategy
    request = dist_checkpointing.save(
        sharded_state_dict, path, async_sharded_save=async_save, **kwargs
    )
    if FEATURES.common_state_in_shards:
        if request is None:
            write_legacy_common_file(path)
        else:
            request.add_finalize_fn(lambda: write_legacy_common_file(path))
    return request


def write_legacy_common_file(path: str) -> None:
    """Copy a finished checkpoint's common state from its shards into common.pt (rank 0).

    0.16 to 0.18 read the common state only from that file; 0.19 prefers it when present, and
    the two hold the same data. Weights-only loadable, as 0.19 itself loads it.
    """
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import load_common_state_dict

    if not dist.is_initialized() or dist.get_rank() == 0:
        with warnings.catch_warnings():
            # torch notes that this one-process read of the shards runs without collectives.
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a")
            common = load_common_state_dict(path)
        tmp = os.path.join(path, LEGACY_COMMON_FILE + ".tmp")
        torch.save(common, tmp)
        os.replace(tmp, os.path.join(path, LEGACY_COMMON_FILE))
    if dist.is_initialized():
        dist.barrier()


def check_readable(path: str, state: Optional[dict] = None) -> None:
    """One line, before any tensor is read, when this megatron-core cannot load `path`
    (`state`: its train state, which names the release that wrote it)."""
    if not FEATURES.reads_common_file or os.path.isfile(os.path.join(path, LEGACY_COMMON_FILE)):
        return
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        return  # not a dist checkpoint at all: megatron's own error says so
    writer = (state or {}).get("megatron_core") or "0.19 or newer"
    raise DanubeConfigError(
        f"checkpoint {path} was written by megatron-core {writer} without {LEGACY_COMMON_FILE}, "
        f"which megatron-core {MCORE_VERSION_STRING} needs to read it; load it with "
        f"megatron-core 0.19, or re-save it there with this package (its saves add the file)"
    )


# ------------------------------------------------------------------------------ optimizer
def _group_key(group: dict) -> tuple:
    # NeMo spells lr_mult/wd_mult as pre_lr_mult/pre_wd_mult; megatron accepts both.
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in STRUCTURAL_GROUP_KEYS)


def _schedule_keys() -> Tuple[str, ...]:
    """The keys by which this release also matches groups, beyond the structural ones."""
    from megatron.core.optimizer import optimizer as mcore_optimizer

    installed = getattr(mcore_optimizer, "param_group_identifier_keys", ())
    extra = [k for k in installed if k not in STRUCTURAL_GROUP_KEYS]
    return tuple(dict.fromkeys(SCHEDULE_GROUP_KEYS + tuple(extra)))


def _saved_groups(state) -> Optional[list]:
    """The param_groups list of one optimizer's loaded state dict (distributed, fp16 or fp32)."""
    inner = state.get("optimizer", state) if isinstance(state, dict) else None
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    return groups if isinstance(groups, list) else None


def _per_optimizer_states(optimizer, state_dict) -> list:
    optimizers = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    if len(optimizers) == 1:
        return [(optimizers[0], state_dict)]
    states = state_dict
    if isinstance(states, dict):
        states = [v for _, v in sorted(states.items())]
    return list(zip(optimizers, states))


def align_param_groups(optimizer, state_dict) -> None:
    """Give the saved parameter groups this run's schedule values (max_lr, min_lr, ...).

    The scheduler is built from the run's config, so those values are the run's; the
    checkpoint supplies moments and steps. 0.19 matches groups by these values too (a resume
    with another `optim.lr` failed); 0.16 kept the checkpoint's values silently. A saved
    group is found by the keys every release matches by; none found is a one-line error.
    """
    keys = _schedule_keys()
    for opt, state in _per_optimizer_states(optimizer, state_dict):
        saved = _saved_groups(state)
        inner = getattr(opt, "optimizer", None)
        if saved is None or inner is None:
            continue
        by_key = {}
        for group in saved:
            by_key.setdefault(_group_key(group), []).append(group)
        for current in inner.param_groups:
            matches = by_key.get(_group_key(current))
            if not matches:
                raise DanubeConfigError(
                    f"the checkpoint's optimizer has no parameter group like this run's "
                    f"{dict(zip(STRUCTURAL_GROUP_KEYS, _group_key(current)))}; load the "
                    f"weights only with checkpoint.load_optimizer=false"
                )
            for group in matches:
                for key in keys:
                    if key in current:
                        group[key] = current[key]
                    else:
                        group.pop(key, None)
