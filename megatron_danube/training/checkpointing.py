"""Distributed checkpoints (megatron dist_checkpointing, torch_dist) that resume exactly:
`CheckpointManager` saves, finds, loads and prunes a run's checkpoints.

A save is written to `iter_N.partial` and renamed when every rank has finished and the manifest
is written; `latest` is replaced atomically after that, and only then are old checkpoints
pruned. A save killed half-way therefore leaves the previous checkpoint as `latest`; a damaged
`latest` is skipped for the newest intact checkpoint with a warning; weights holding NaN or Inf
are never saved. What is on disk is described in `checkpoint_format`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Callable, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException

from megatron_danube import compat
from megatron_danube.config.sections import CheckpointSection
from megatron_danube.errors import DanubeConfigError
from megatron_danube.runtime.distributed import raise_rank0_problem
from megatron_danube.training import manifest
from megatron_danube.training.checkpoint_format import (
    OPTIMIZER_METADATA,
    POINTER_FILE,
    STATE_FILE,
    checkpoint_names,
    latest_intact,
    layout_signature,
    model_key,
    model_sharded_state_dict,
    read_train_state,
    restore_rng,
    rng_sharded_object,
    verify_checkpoint,
    weights_are_finite,
)
from megatron_danube.training.checkpoint_writer import prepare_results_queue
from megatron_danube.training.optimizer_state_repairs import (
    ensure_optimizer_state,
    load_optimizer_state,
    materialise_fresh_optimizer_state,
)

logger = logging.getLogger(__name__)


def _only(sharded: dict, keep: Optional[Callable[[str], bool]]) -> dict:
    """The model chunks' sharded state with the entries `keep` accepts."""
    if keep is None:
        return sharded
    return {key: {n: t for n, t in part.items() if keep(n)} for key, part in sharded.items()}


def _barrier():
    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Saves, verifies, finds and prunes a run's checkpoints; decides when a save is due."""

    def __init__(
        self,
        run_dir: str,
        cfg: Optional[CheckpointSection] = None,
        holds: Optional[Callable[[str], bool]] = None,
    ):
        """`holds(name)`: whether model state `name` is saved (default: all of it)."""
        cfg = cfg or CheckpointSection()
        self.holds = holds
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
        return latest_intact(self.dir, verify=self.cfg.verify)

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
        prepare_results_queue(async_saves=self._async_queue is not None)
        self.last_saved_iteration = iteration
        name = f"iter_{iteration:07d}"
        final, partial = os.path.join(self.dir, name), os.path.join(self.dir, name + ".partial")
        if dist.get_rank() == 0:
            os.makedirs(self.dir, exist_ok=True)
            if os.path.exists(partial):
                shutil.rmtree(partial)  # leftovers of a save that was killed
            os.makedirs(partial)
        _barrier()
        sharded = _only(model_sharded_state_dict(chunks), self.holds)
        if optimizer is not None:
            materialise_fresh_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=False, metadata=OPTIMIZER_METADATA
            )
        sharded["rng_state"] = rng_sharded_object(is_loading=False)
        state = dict(train_state, layout=layout_signature(), checkpoint=name)
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
            os.replace(tmp, os.path.join(self.dir, POINTER_FILE))
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
        absent: Optional[Callable[[str], bool]] = None,
    ) -> dict:
        """Load weights (and optimizer and RNG where asked and possible); returns the state.

        `verify` checks the manifest first (`latest()` has already done so for its answer);
        `before_load(state)` may refuse the checkpoint before any tensor is read; parameters
        whose names `absent` accepts are not in the checkpoint and keep their values (a start
        checkpoint has no LoRA adapters).
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
        if absent is not None:
            sharded = _only(sharded, lambda name: not absent(name))
        if load_optimizer and optimizer is not None:
            ensure_optimizer_state(optimizer)
            sharded["optimizer"] = optimizer.sharded_state_dict(
                sharded, is_loading=True, metadata=OPTIMIZER_METADATA
            )
        same_layout = state.get("layout") == layout_signature()
        if same_layout:
            sharded["rng_state"] = rng_sharded_object(is_loading=True)
        try:
            loaded = dist_checkpointing.load(sharded, path, strict=StrictHandling.LOG_UNEXPECTED)
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            raise DanubeConfigError(
                f"cannot load checkpoint {path}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        for i, chunk in enumerate(chunks):
            module = getattr(chunk, "module", chunk)
            result = module.load_state_dict(loaded[model_key(i, len(chunks))], strict=False)
            missing = [k for k in result.missing_keys if absent is None or not absent(k)]
            if missing or result.unexpected_keys:
                raise DanubeConfigError(
                    f"checkpoint {path} does not fit the model: missing {missing[:3]}, "
                    f"unexpected {result.unexpected_keys[:3]}"
                )
        if load_optimizer and optimizer is not None:
            load_optimizer_state(optimizer, loaded["optimizer"])
        if same_layout and "rng_state" in loaded:
            restore_rng(loaded["rng_state"])
        return state
