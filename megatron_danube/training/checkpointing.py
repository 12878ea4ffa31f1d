"""Distributed checkpoints (megatron dist_checkpointing, torch_dist) that resume exactly.

Layout of a run's `checkpoints/` folder:

    iter_0000100/          model, optimizer (fully reshardable), RNG (sharded, per rank)
        train_state.json   iteration, consumed tokens, stage, model, schedule, layout (JSON)
        manifest.json      every file's size and CRC32, checked before the folder is used
    latest                 the name of the newest *complete* checkpoint

A save is written to `iter_N.partial` and renamed when every rank has finished and the manifest
is written; `latest` is replaced atomically after that, and only then are old checkpoints
pruned. A save killed half-way therefore leaves the previous checkpoint as `latest`; a damaged
`latest` is skipped for the newest intact checkpoint with a warning; weights holding NaN or Inf
are never saved. Nothing is loaded with pickle: the JSON holds the small state, and
`TORCH_FORCE_WEIGHTS_ONLY_LOAD=1` makes every `torch.load` megatron does weights-only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_danube.config.sections import CheckpointSection
from megatron_danube.errors import DanubeConfigError
from megatron_danube.runtime import compat
from megatron_danube.runtime.distributed import all_ranks_agree, raise_rank0_problem
from megatron_danube.training import manifest

logger = logging.getLogger(__name__)

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
        if isinstance(opt.optimizer, torch.optim.SGD):
            _ensure_sgd_state(opt)
            continue
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            saved_lrs = [g["lr"] for g in opt.optimizer.param_groups]
            for g in opt.optimizer.param_groups:
                g["lr"] = 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, lr in zip(opt.optimizer.param_groups, saved_lrs):
                g["lr"] = lr


def materialise_fresh_optimizer_state(optimizer) -> None:
    """Give an optimizer that has never stepped the state a fresh one stands for, so it can be
    saved: megatron's distributed optimizer cannot describe an empty state (`assert
    len(steps) == 1`), which a run whose every step so far was skipped still has.

    One step at lr 0 on zero gradients creates the state tensors without moving a weight; they
    are then zeroed, Adam's step included, which is exactly torch's state before a first step
    (and, for SGD without dampening, a zero momentum buffer equals none): a resume from this
    checkpoint trains as the uninterrupted run does.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        if len(inner.state) > 0:
            continue
        saved_lrs = [group["lr"] for group in inner.param_groups]
        params = [p for group in inner.param_groups for p in group["params"] if p.numel() > 0]
        saved_grads = [p.grad for p in params]
        for group in inner.param_groups:
            group["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            inner.step()
        finally:
            for group, lr in zip(inner.param_groups, saved_lrs):
                group["lr"] = lr
            for p, grad in zip(params, saved_grads):
                p.grad = grad
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()


def _ensure_sgd_state(opt) -> None:
    """megatron has no state initialiser for SGD (loading its checkpoint fails on a None
    `init_state_fn`): give each parameter the momentum buffer a step would have made."""

    def init_sgd_state(inner, config=None):
        for group in inner.param_groups:
            if group.get("momentum", 0):
                for param in group["params"]:
                    state = inner.state[param]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(param)

    if getattr(opt, "init_state_fn", None) is None:
        opt.init_state_fn = init_sgd_state


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
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    if not any(isinstance(opt, DistributedOptimizer) for opt in members):
        _restore_zero_adam_step(state_dict)
    try:
        compat.align_param_groups(optimizer, state_dict)
        optimizer.load_state_dict(state_dict)
    finally:
        for opt, original in patched:
            opt._set_main_param_and_optimizer_states = original
    fix_shared_adam_step(optimizer)


def _restore_zero_adam_step(state_dict) -> None:
    """megatron's non-distributed optimizer saves Adam's shared step only when it is truthy
    (`if step:`), so a state saved before the first step (step 0) comes back without one and
    torch's Adam fails on it (`KeyError: 'step'`). Put the zero back."""
    if isinstance(state_dict, (list, tuple)):
        for item in state_dict:
            _restore_zero_adam_step(item)
        return
    if not isinstance(state_dict, dict):
        return
    per_param = state_dict.get("state")
    if isinstance(per_param, dict) and "param_groups" in state_dict:
        adam_states = [v for v in per_param.values() if isinstance(v, dict) and "exp_avg" in v]
        if adam_states and "common_step" not in per_param:
            if not any("step" in v for v in adam_states):
                per_param["common_step"] = torch.tensor(0.0)
        return
    for value in state_dict.values():
        _restore_zero_adam_step(value)


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


def weights_are_finite(chunks) -> bool:
    """Whether every parameter on every rank is finite."""
    ok = all(bool(torch.isfinite(p).all()) for chunk in chunks for p in chunk.parameters())
    return all_ranks_agree(ok)


def read_pointer(folder: str) -> Optional[str]:
    """The checkpoint name in `folder/latest`, or None where there is no pointer."""
    pointer = os.path.join(folder, "latest")
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


def start_writer_helpers_immune_to_signals() -> None:
    """Start megatron's checkpoint-writer helper process now, deaf to SIGTERM/SIGINT/SIGUSR1.

    megatron's writer sends its results through a `multiprocessing.Manager` queue that it
    spawns on first use. A launcher that signals the whole process group (torchrun on SIGTERM,
    a terminal on Ctrl-C) kills that helper too, and the save the signal asked for then dies
    with BrokenPipeError. A process spawned while a signal is ignored keeps ignoring it, so
    the helper is started here with the stop signals ignored, then the handlers come back.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    start = getattr(filesystem_async, compat.FEATURES.writer_queue_helper, None)
    if start is None or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stop_signals}
    try:
        start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CheckpointManager:
    """Saves, verifies, finds and prunes a run's checkpoints; decides when a save is due."""

    def __init__(self, run_dir: str, cfg: Optional[CheckpointSection] = None):
        cfg = cfg or CheckpointSection()
        self.dir = os.path.join(run_dir, "checkpoints")
        self.cfg = cfg
        self.keep_last = max(1, cfg.keep_last)
        self.last_saved_iteration: Optional[int] = None
        self._async_queue = None
        if cfg.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._async_queue = AsyncCallsQueue()

    # ----------------------------------------------------------------------------- finding
    def latest(self) -> Optional[str]:
        """The newest intact checkpoint: `latest` when it verifies, else the newest that does."""
        pointed = read_pointer(self.dir)
        candidates = checkpoint_names(self.dir)
        problems = []
        if pointed is not None and pointed not in candidates:
            problems.append(f"`latest` names {pointed}, which is missing or incomplete")
            logger.warning("%s in %s; looking for an older checkpoint", problems[-1], self.dir)
        if pointed in candidates:  # try the pointer first, then the others, newest first
            candidates.remove(pointed)
            candidates.append(pointed)
        for name in reversed(candidates):
            path = os.path.join(self.dir, name)
            problem = verify_checkpoint(path) if self.cfg.verify else None
            if problem is None:
                return path
            problems.append(f"{name} is damaged: {problem}")
            logger.warning("checkpoint %s; trying an older one", problems[-1])
        if not problems:
            return None
        raise DanubeConfigError(
            f"no intact checkpoint in {self.dir} ({'; '.join(problems)}); restore one, or move "
            f"the folder away to start afresh"
        )

    # ----------------------------------------------------------------------------- saving
    def save_if_due(self, iteration: int, chunks, optimizer, train_state, *, final: bool = False):
        """Save at the interval, and always when `final`; never twice for one iteration."""
        interval = self.cfg.save_interval
        due = final or (interval is not None and iteration % interval == 0)
        if not due or self.last_saved_iteration == iteration:
            return None
        return self.save(iteration, chunks, optimizer, train_state())

    def save(self, iteration: int, chunks, optimizer, train_state: dict) -> Optional[str]:
        if not weights_are_finite(chunks):
            logger.error(
                "not saving iteration %d: the weights hold NaN or Inf; `latest` stays at the "
                "last healthy checkpoint",
                iteration,
            )
            return None
        self._check_disk_space(iteration)
        start_writer_helpers_immune_to_signals()  # before megatron's writer first starts it
        self.last_saved_iteration = iteration
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
            materialise_fresh_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=OPTIMIZER_METADATA
            )
        sharded["rng_state"] = _rng_sharded_object(is_loading=False)
        state = dict(train_state, layout=_layout_signature(), checkpoint=name)
        state["megatron_core"] = compat.MCORE_VERSION_STRING

        def finalize():
            self._finalize(name, partial, final, state)

        try:
            if self._async_queue is not None:
                request = compat.save_checkpoint(
                    sharded, partial, async_save=True, validate_access_integrity=True
                )
                request.add_finalize_fn(finalize)
                self._async_queue.schedule_async_request(request)
            else:
                compat.save_checkpoint(sharded, partial, validate_access_integrity=True)
                finalize()
        except Exception as exc:
            # A half-written save must not keep the disk full; `latest` still names the last
            # complete checkpoint.
            shutil.rmtree(partial, ignore_errors=True)
            free = shutil.disk_usage(self.dir).free / 1e9
            raise DanubeConfigError(
                f"saving checkpoint {name} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); {free:.1f} GB free in "
                f"{self.dir}; the previous checkpoint is intact"
            ) from exc
        return final

    def _check_disk_space(self, iteration: int) -> None:
        """Refuse a save that cannot fit, judged by the size of the last checkpoint."""
        problem = ""
        if dist.get_rank() == 0:
            previous = checkpoint_names(self.dir)
            if previous:
                folder = os.path.join(self.dir, previous[-1])
                needed = sum(
                    os.path.getsize(os.path.join(folder, n)) for n in manifest.list_files(folder)
                )
                free = shutil.disk_usage(self.dir).free
                if free < needed * 1.05:
                    problem = (
                        f"not enough disk space to save iteration {iteration}: {free / 1e9:.2f} "
                        f"GB free in {self.dir}, the last checkpoint took {needed / 1e9:.2f} GB; "
                        f"free some space (checkpoint.keep_last also bounds what is kept)"
                    )
        raise_rank0_problem(problem)

    def _finalize(self, name: str, partial: str, final: str, state: dict) -> None:
        """State file, manifest (checksums read back from disk, spread over the ranks),
        rename, `latest`, then pruning: in that order, so a crash anywhere leaves the previous
        checkpoint as `latest` and never removes a checkpoint before its successor is whole."""
        _barrier()
        rank = dist.get_rank()
        world = dist.get_world_size()
        if rank == 0:
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(state, f, indent=1)
        _barrier()
        names = manifest.list_files(partial)
        entries = manifest.describe(partial, names[rank::world])
        gathered = [None] * world
        dist.all_gather_object(gathered, entries)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            manifest.write_manifest(partial, merged)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            tmp = os.path.join(self.dir, "latest.tmp")
            with open(tmp, "w") as f:
                f.write(name + "\n")
            os.replace(tmp, os.path.join(self.dir, "latest"))
            self._prune(keep=name)
            logger.info("saved checkpoint %s (%d files, verified)", final, len(merged))
        _barrier()

    def maybe_finalize(self, blocking: bool = False) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking, no_dist=False)

    def close(self) -> None:
        if self._async_queue is not None:
            self._async_queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
            self._async_queue.close()

    def _prune(self, keep: str) -> None:
        for old in checkpoint_names(self.dir)[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(os.path.join(self.dir, old), ignore_errors=True)

    # ----------------------------------------------------------------------------- loading
    def load(
        self,
        path: str,
        chunks,
        optimizer,
        *,
        load_optimizer: bool = True,
        verify: bool = False,
        before_load: Optional[Callable[[dict], None]] = None,
    ) -> dict:
        """Load weights (and optimizer and RNG where asked and possible); returns the state.

        `verify` checks the manifest first (`latest()` has already done so for its answer);
        `before_load(state)` may refuse the checkpoint before any tensor is read.
        """
        state = read_train_state(path)
        if before_load is not None:
            before_load(state)
        if verify and self.cfg.verify:
            problem = verify_checkpoint(path)
            if problem:
                raise DanubeConfigError(f"checkpoint {path} is damaged: {problem}")
        compat.check_readable(path, state)
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
            loaded = dist_checkpointing.load(sharded, path, strict=StrictHandling.LOG_UNEXPECTED)
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


def resolve_checkpoint(path: str, what: str = "--load") -> str:
    """A run dir, its checkpoints/ dir, or an iter_* dir -> the iter dir to read.

    The checkpoint is verified against its manifest; a run dir whose `latest` is damaged
    resolves to its newest intact checkpoint (with a warning), as a resume would.
    """
    if not os.path.isdir(path):
        raise DanubeConfigError(f"{what} {path}: no such directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        problem = verify_checkpoint(path)
        if problem:
            raise DanubeConfigError(f"checkpoint {path} is damaged: {problem}")
        return path
    for run_dir in (path, os.path.dirname(os.path.normpath(path))):
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(ckpt_dir) and (run_dir == path or os.path.samefile(ckpt_dir, path)):
            found = CheckpointManager(run_dir).latest()
            if found:
                return found
    raise DanubeConfigError(
        f"{what} {path}: not a megatron_danube checkpoint (no {STATE_FILE}, no latest pointer)"
    )
