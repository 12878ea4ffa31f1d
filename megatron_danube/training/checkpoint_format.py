"""What a checkpoint is on disk, and how one is found and checked before it is used.

Layout of a run's `checkpoints/` folder:

    iter_0000100/          model, optimizer (fully reshardable), RNG (sharded, per rank)
        train_state.json   iteration, consumed tokens, stage, model, schedule, layout (JSON)
        manifest.json      every file's size and CRC32, checked before the folder is used
    latest                 the name of the newest *complete* checkpoint

Nothing is loaded with pickle: the JSON holds the small state, and
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes every `torch.load` megatron does weights-only.
Saving, loading and pruning are `checkpointing.CheckpointManager`'s.
"""

from __future__ import annotations

import json
import logging
import os
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_danube.errors import DanubeConfigError
from megatron_danube.runtime.distributed import all_ranks_agree
from megatron_danube.training import manifest

logger = logging.getLogger(__name__)

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
STATE_FILE = "train_state.json"
POINTER_FILE = "latest"


# ------------------------------------------------------------------------ sharded state dict
def model_key(i: int, n: int) -> str:
    # Only ShardedTensor keys (global parameter names) decide where data is stored, so these
    # dict keys may differ between layouts: a VPP=2 run loads a VPP=1 checkpoint and back.
    return "model" if n == 1 else f"model{i}"


def model_sharded_state_dict(chunks) -> dict:
    n = len(chunks)
    # Unwrapped from DDP so the stored keys are the model's own names (no "module." prefix).
    return {
        model_key(i, n): getattr(chunk, "module", chunk).sharded_state_dict()
        for i, chunk in enumerate(chunks)
    }


def rng_sharded_object(is_loading: bool) -> ShardedObject:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    rank, world = dist.get_rank(), dist.get_world_size()
    state = (
        {}
        if is_loading
        else {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states(),
        }
    )
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def restore_rng(rng: dict) -> None:
    """Put back the RNG states `rng_sharded_object` saved (only valid in the same layout)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    get_cuda_rng_tracker().set_states(rng["tracker"])


def layout_signature() -> dict:
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }


def weights_are_finite(chunks) -> bool:
    """Whether every parameter on every rank is finite."""
    ok = all(bool(torch.isfinite(p).all()) for chunk in chunks for p in chunk.parameters())
    return all_ranks_agree(ok)


# ------------------------------------------------------------------------ state and pointers
def read_train_state(path: str) -> dict:
    """A checkpoint's train_state.json; a one-line error when it is missing or unreadable."""
    state_path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_path):
        raise DanubeConfigError(
            f"{path} is not a complete megatron_danube checkpoint (no {STATE_FILE})"
        )
    try:
        with open(state_path) as f:
            state = json.load(f)
    except (OSError, ValueError) as exc:
        raise DanubeConfigError(
            f"{state_path} is unreadable ({type(exc).__name__}); restore it or remove the "
            f"checkpoint folder"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise DanubeConfigError(
            f"{state_path} is not a train state (no iteration); restore it or remove the folder"
        )
    return state


def read_pointer(folder: str) -> Optional[str]:
    """The checkpoint name in `folder/latest`, or None where there is no pointer."""
    pointer = os.path.join(folder, POINTER_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return f.read().strip() or None


def checkpoint_names(folder: str) -> List[str]:
    """Complete `iter_*` folders (they have a state file), oldest first."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        n
        for n in os.listdir(folder)
        if n.startswith("iter_")
        and not n.endswith(".partial")
        and os.path.isfile(os.path.join(folder, n, STATE_FILE))
    )


# ------------------------------------------------------------------------ checking and finding
def verify_checkpoint(path: str) -> Optional[str]:
    """None when `path` matches its manifest, else the problem, checked by all ranks together.

    Each rank reads a share of the files; a checkpoint written before manifests existed is
    accepted with a warning.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not os.path.isfile(os.path.join(path, manifest.MANIFEST_FILE)):
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            logger.warning("%s has no manifest (an older checkpoint); loading unverified", path)
            return None
    problem = manifest.verify_folder(path, rank, world)
    if not dist.is_initialized():
        return problem
    problems = [None] * world
    dist.all_gather_object(problems, problem)
    return next((p for p in problems if p), None)


def latest_intact(folder: str, verify: bool = True) -> Optional[str]:
    """The newest intact checkpoint in `folder`: the one `latest` names when it verifies, else
    the newest that does; None where there is none; an error when every one is damaged."""
    pointed = read_pointer(folder)
    candidates = checkpoint_names(folder)
    problems = []
    if pointed is not None and pointed not in candidates:
        problems.append(f"`latest` names {pointed}, which is missing or incomplete")
        logger.warning("%s in %s; looking for an older checkpoint", problems[-1], folder)
    if pointed in candidates:  # try the pointer first, then the others, newest first
        candidates.remove(pointed)
        candidates.append(pointed)
    for name in reversed(candidates):
        path = os.path.join(folder, name)
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        problems.append(f"{name} is damaged: {problem}")
        logger.warning("checkpoint %s; trying an older one", problems[-1])
    if not problems:
        return None
    raise DanubeConfigError(
        f"no intact checkpoint in {folder} ({'; '.join(problems)}); restore one, or move "
        f"the folder away to start afresh"
    )


def resolve_checkpoint(path: str, what: str = "--load", verify: bool = True) -> str:
    """A run dir, its checkpoints/ dir, or an iter_* dir -> the iter dir to read.

    The checkpoint is verified against its manifest (unless `verify` is false, i.e.
    `checkpoint.verify: false`); a run dir whose `latest` is damaged resolves to its newest
    intact checkpoint (with a warning), as a resume would.
    """
    if not os.path.isdir(path):
        raise DanubeConfigError(f"{what} {path}: no such directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        problem = verify_checkpoint(path) if verify else None
        if problem:
            raise DanubeConfigError(f"checkpoint {path} is damaged: {problem}")
        return path
    for run_dir in (path, os.path.dirname(os.path.normpath(path))):
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(ckpt_dir) and (run_dir == path or os.path.samefile(ckpt_dir, path)):
            found = latest_intact(ckpt_dir, verify=verify)
            if found:
                return found
    raise DanubeConfigError(
        f"{what} {path}: not a megatron_danube checkpoint (no {STATE_FILE}, no latest "
        f"pointer); give a run directory, a checkpoint, or an HF model directory"
    )
