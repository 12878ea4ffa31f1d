"""The optimizer (megatron's, from `OptimSection`) and its token-based LR schedule."""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_danube.config.sections import OptimSection

MIN_LR_RATIO = 0.1  # cosine to 10% of the peak when optim.min_lr is null (Llama-2)


def optimizer_config(optim: OptimSection, params_dtype: torch.dtype) -> OptimizerConfig:
    """megatron's OptimizerConfig from the section, its precision set from the parameters."""
    fields = {f.name for f in dataclasses.fields(OptimizerConfig) if f.init}
    values = {name: getattr(optim, name) for name in fields}
    values.update(
        min_lr=min_lr(optim),
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
    )
    return OptimizerConfig(**values)


def min_lr(optim: OptimSection) -> float:
    return optim.min_lr if optim.min_lr is not None else optim.lr * MIN_LR_RATIO


def make_optimizer(optim: OptimSection, chunks, config):
    """megatron's optimizer over DDP-wrapped `chunks`; fp16 also gets its loss scaling hook."""
    optimizer = get_megatron_optimizer(optimizer_config(optim, config.params_dtype), chunks)
    if config.params_dtype == torch.float16:
        config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_optimizer(optim: OptimSection, chunks, config, total_tokens: int):
    """(megatron optimizer, LR scheduler) for DDP-wrapped `chunks` of `config`.

    The schedule's unit is tokens (warm-up, cosine decay over `total_tokens`), so it is
    unchanged when a stage changes the sequence length and with it the sequences per step.
    """
    optimizer = make_optimizer(optim, chunks, config)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=min_lr(optim),
        lr_warmup_steps=optim.warmup_tokens,
        lr_decay_steps=total_tokens,
        lr_decay_style="cosine",
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=total_tokens,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
