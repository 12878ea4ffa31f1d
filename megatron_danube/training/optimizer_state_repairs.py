"""Repairs of megatron-core's optimizer-state handling, so that checkpoints resume exactly.

Each repair works around one megatron behaviour, named by a flag of `compat.FEATURES`
(which says on which releases it happens), and is applied only where its flag is set. Some
replace private megatron methods for the duration of one call; nothing stays patched.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_danube import compat


def _members(optimizer) -> list:
    """The optimizers a (possibly chained) megatron optimizer is made of."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


# ------------------------------------------------------------------------------ before a save
def materialise_fresh_optimizer_state(optimizer) -> None:
    """Give an optimizer that has never stepped the state a fresh one stands for, so it can be
    saved (`FEATURES.empty_optimizer_state_unsaveable`): a run whose every step so far was
    skipped still has none.

    One step at lr 0 on zero gradients creates the state tensors without moving a weight; they
    are then zeroed, Adam's step included, which is exactly torch's state before a first step
    (and, for SGD without dampening, a zero momentum buffer equals none): a resume from this
    checkpoint trains as the uninterrupted run does.
    """
    if not compat.FEATURES.empty_optimizer_state_unsaveable:
        return
    for opt in _members(optimizer):
        inner = getattr(opt, "optimizer", opt)
        if len(inner.state) > 0:
            continue
        _step_on_zero_grads_at_lr0(inner)
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    value.zero_()


def _step_on_zero_grads_at_lr0(inner) -> None:
    """One step of a torch optimizer that creates its state and moves no weight."""
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


# ------------------------------------------------------------------------------ before a load
def ensure_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer the state a checkpoint's is loaded into.

    A distributed Adam that never stepped has none (`FEATURES.fresh_dist_optimizer_has_no_state`):
    it gets megatron's dummy values from one step at lr 0, replaced by the checkpoint's before
    any training. SGD gets a state initialiser (`FEATURES.sgd_has_no_state_initialiser`).
    """
    features = compat.FEATURES
    for opt in _members(optimizer):
        if isinstance(opt.optimizer, torch.optim.SGD):
            if features.sgd_has_no_state_initialiser:
                _ensure_sgd_state(opt)
            continue
        if not features.fresh_dist_optimizer_has_no_state:
            continue
        if _is_distributed(opt) and len(opt.optimizer.state) == 0:
            saved_lrs = [g["lr"] for g in opt.optimizer.param_groups]
            for g in opt.optimizer.param_groups:
                g["lr"] = 0.0
            opt._init_optimizer_states_with_dummy_values()
            for g, lr in zip(opt.optimizer.param_groups, saved_lrs):
                g["lr"] = lr


def _ensure_sgd_state(opt) -> None:
    """Give each parameter the momentum buffer a step would have made, through the
    `init_state_fn` megatron leaves None for SGD (loading its checkpoint calls it)."""

    def init_sgd_state(inner, config=None):
        for group in inner.param_groups:
            if group.get("momentum", 0):
                for param in group["params"]:
                    state = inner.state[param]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(param)

    if getattr(opt, "init_state_fn", None) is None:
        opt.init_state_fn = init_sgd_state


# ------------------------------------------------------------------------------ the load
def load_optimizer_state(optimizer, state_dict) -> None:
    """optimizer.load_state_dict, correct with torch's Adam (no TE/apex: also our GPU image).

    The saved parameter groups first take this run's schedule values (`compat`); the repairs
    flagged for this release are applied around the load.
    """
    features = compat.FEATURES
    members = _members(optimizer)
    if features.drops_zero_adam_step and not any(_is_distributed(opt) for opt in members):
        _restore_zero_adam_step(state_dict)
    set_aside = (
        _param_step_set_aside(members)
        if features.reshardable_load_lacks_param_step
        else contextlib.nullcontext()
    )
    with set_aside:
        compat.align_param_groups(optimizer, state_dict)
        optimizer.load_state_dict(state_dict)
    if features.load_shares_adam_step:
        fix_shared_adam_step(optimizer)


@contextlib.contextmanager
def _param_step_set_aside(members):
    """While the distributed optimizers copy each parameter's state, Adam's `step` is set
    aside (`FEATURES.reshardable_load_lacks_param_step`) and put back as the parameter's own
    tensor."""
    patched = [
        (opt, opt._set_main_param_and_optimizer_states) for opt in members if _is_distributed(opt)
    ]
    for opt, original in patched:
        opt._set_main_param_and_optimizer_states = _copy_without_step(opt, original)
    try:
        yield
    finally:
        for opt, original in patched:
            opt._set_main_param_and_optimizer_states = original


def _copy_without_step(opt, original):
    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        state = opt.optimizer.state[main_param]
        step = state.pop("step", None)
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.detach().clone()

    return set_states


def fix_shared_adam_step(optimizer) -> int:
    """Give every parameter its own Adam `step` tensor (`FEATURES.load_shares_adam_step`).
    Returns how many were shared.

    One `step` object shared by all parameters is advanced by each param's update, so after
    one step it reads N instead of 1 and bias correction is wrong.
    """
    seen, shared = set(), 0
    for opt in _members(optimizer):
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


def _restore_zero_adam_step(state_dict) -> None:
    """Put back the zero step a state saved before the first step lacks
    (`FEATURES.drops_zero_adam_step`), wherever in the (nested) state dict it is missing."""
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
