"""Distributed checkpoints (megatron dist_checkpointing, torch_dist) that resume exactly.

Layout of a run's `checkpoints/` folder:

    iter_0000100/          model, optimizer (fully reshardable), RNG (sharded, per rank)
        train_state.json   iteration, consumed tokens, stage, scheduler, layout (plain JSON)
    latest                 the name of the newest *complete* checkpoint

A save is written to `iter_N.partial` and renamed when every rank has finished; `latest` is
replaced atomically after that. A save killed half-way therefore leaves the previous
checkpoint as `latest`. Nothing is loaded with pickle: the JSON holds the small state, and
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes every `torch.load` megatron does weights-only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_danube.errors import DanubeConfigError

OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
STATE_FILE = "train_state.json"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _model_key(i: int, n: int) -> str:
    # Only ShardedTensor keys (global parameter names) decide where data is stored, so these
    # dict keys may differ between layouts: a VPP=2 run loads a VPP=1 checkpoint and back.
    return "model" if n == 1 else f"model{i}"


def model_sharded_state_dict(chunks) -> dict:
    n = len(chunks)
    # Unwrapped from DDP so the stored keys are the model's own names (no "module." prefix).
    return {
        _model_key(i, n): getattr(chunk, "module", chunk).sharded_state_dict()
        for i, chunk in enumerate(chunks)
    }


def _rng_sharded_object(is_loading: bool) -> ShardedObject:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    rank, world = dist.get_rank(), dist.get_world_size()
    state = {} if is_loading else {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _layout_signature() -> dict:
    return {
        "world_size": dist.get_world_size(),
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size(),
    }


def fix_shared_adam_step(optimizer) -> int:
    """Give every parameter its own Adam `step` tensor. Returns how many were shared.

    After DistributedOptimizer.load_state_dict, torch's Adam (the fallback without TE/apex)
    can end up with one `step` tensor object shared by all parameters; each param's update then
    advances it, so after one step it reads N instead of 1 and bias correction is wrong.
    """
    seen, shared = set(), 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            step = state.get("step") if isinstance(state, dict) else None
            if isinstance(step, torch.Tensor):
                if id(step) in seen:
                    state["step"] = step.clone()
                    shared += 1
                else:
                    seen.add(id(step))
    return shared


def ensure_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state to load into; make it (zeros).

    megatron 0.16 only does this itself for the FSDP format (else: `assert len(steps) == 1`).
    The values are replaced by the checkpoint's; the step runs at lr 0 before any training.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            saved_lrs = [g["lr"] for g in opt.optimizer.param_groups]
            for g in opt.optimizer.param_groups:
                g["lr"] = 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, lr in zip(opt.optimizer.param_groups, saved_lrs):
                g["lr"] = lr


def load_optimizer_state(optimizer, state_dict) -> None:
    """optimizer.load_state_dict, correct with torch's Adam (no TE/apex: also our GPU image).

    megatron 0.16's DistributedOptimizer, loading the fully-reshardable format with torch Adam,
    (1) puts one `step` tensor object into every parameter's state, and (2) then fails copying
    the parameter state (`KeyError: 'step'`, the format stores no per-param step). While the
    parameter state is copied, `step` is set aside; it is put back as a tensor per parameter.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            state = opt.optimizer.state[main_param]
            step = state.pop("step", None)
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step.detach().clone()

        opt._set_main_param_and_optimizer_states = set_states
        patched.append((opt, original))
    try:
        optimizer.load_state_dict(state_dict)
    finally:
        for opt, original in patched:
            opt._set_main_param_and_optimizer_states = original
    fix_shared_adam_step(optimizer)


class CheckpointManager:
    def __init__(self, run_dir: str, keep_last: int = 3, async_save: bool = False):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep_last = max(1, keep_last)
        self.async_save = async_save
        self._async_queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()

    # ----------------------------------------------------------------------------- finding
    def latest(self) -> Optional[str]:
        pointer = os.path.join(self.dir, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.dir, name)
        if not os.path.isfile(os.path.join(path, STATE_FILE)):
            raise DanubeConfigError(
                f"{pointer} names {name}, which is missing or incomplete; point `latest` at a "
                f"complete iter_* folder or remove it to start afresh"
            )
        return path

    # ----------------------------------------------------------------------------- saving
    def save(self, iteration: int, chunks, optimizer, train_state: dict) -> str:
        name = f"iter_{iteration:07d}"
        final, partial = os.path.join(self.dir, name), os.path.join(self.dir, name + ".partial")
        if dist.get_rank() == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.exists(partial):
                shutil.rmtree(partial)  # leftovers of a save that was killed
            os.makedirs(partial)
        _barrier()
        sharded = model_sharded_state_dict(chunks)
        if optimizer is not None:
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=OPTIMIZER_METADATA
            )
        sharded["rng_state"] = _rng_sharded_object(is_loading=False)
        state = dict(train_state, layout=_layout_signature(), checkpoint=name)

        def finalize():
            _barrier()
            if dist.get_rank() == 0:
                # the state file marks the folder complete; written after all shards
                with open(os.path.join(partial, STATE_FILE), "w") as f:
                    json.dump(state, f, indent=1)
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(partial, final)
                tmp = os.path.join(self.dir, "latest.tmp")
                with open(tmp, "w") as f:
                    f.write(name + "\n")
                os.replace(tmp, os.path.join(self.dir, "latest"))
                self._prune(keep=name)
            _barrier()

        if self.async_save:
            request = dist_checkpointing.save(
                sharded, partial, async_sharded_save=True, validate_access_integrity=True
            )
            request.add_finalize_fn(finalize)
            self._async_queue.schedule_async_request(request)
        else:
            dist_checkpointing.save(sharded, partial, validate_access_integrity=True)
            finalize()
        return final

    def maybe_finalize(self, blocking: bool = False) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking, no_dist=False)

    def close(self) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
            self._async_queue.close()

    def _prune(self, keep: str) -> None:
        names = sorted(
            n for n in os.listdir(self.dir) if n.startswith("iter_") and not n.endswith(".partial")
        )
        for old in names[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)

    # ----------------------------------------------------------------------------- loading
    def load(self, path: str, chunks, optimizer, *, load_optimizer: bool = True) -> dict:
        state_path = os.path.join(path, STATE_FILE)
        if not os.path.isfile(state_path):
            raise DanubeConfigError(
                f"{path} is not a complete megatron_danube checkpoint (no {STATE_FILE})"
            )
        with open(state_path) as f:
            state = json.load(f)
        sharded = model_sharded_state_dict(chunks)
        if load_optimizer and optimizer is not None:
            ensure_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=True, metadata=OPTIMIZER_METADATA
            )
        same_layout = state.get("layout") == _layout_signature()
        if same_layout:
            sharded["rng_state"] = _rng_sharded_object(is_loading=True)
        try:
            loaded = dist_checkpointing.load(
                sharded, path, strict=StrictHandling.LOG_UNEXPECTED
            )
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            raise DanubeConfigError(
                f"cannot load checkpoint {path}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        for i, chunk in enumerate(chunks):
            getattr(chunk, "module", chunk).load_state_dict(loaded[_model_key(i, len(chunks))])
        if load_optimizer and optimizer is not None:
            load_optimizer_state(optimizer, loaded["optimizer"])
        if same_layout and "rng_state" in loaded:
            from megatron.core.tensor_parallel import get_cuda_rng_tracker

            rng = loaded["rng_state"]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
            get_cuda_rng_tracker().set_states(rng["tracker"])
        return state
