"""The one model build: TransformerConfig, the GPTModel chunks of this rank, then (for
training) megatron DDP, optimizer and LR schedule.

Shared by the trainer, the throughput benchmark and checkpoint conversion. Between building
the chunks and wrapping them, `pre_wrap` hooks may transform them (add adapters, freeze
weights): DDP and the optimizer only take parameters that still require gradients. Forward-only
work (conversion, evaluation) stops after `build_model` and never makes an optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_danube.config import OptimSection, ParallelLayout, PrecisionConfig, RecomputeConfig

ChunkHook = Callable[[List[torch.nn.Module]], List[torch.nn.Module]]


@dataclass
class TrainableModel:
    """A model ready to train: DDP-wrapped chunks, megatron optimizer, token LR schedule."""

    config: TransformerConfig
    chunks: List[torch.nn.Module]
    optimizer: object
    scheduler: object


def build_model(
    model_cfg,
    *,
    layout: ParallelLayout,
    spec: str,
    device: torch.device,
    precision: Optional[PrecisionConfig] = None,
    recompute: Optional[RecomputeConfig] = None,
    overrides: Optional[Dict[str, object]] = None,
    pre_wrap: Sequence[ChunkHook] = (),
):
    """(TransformerConfig, this rank's model chunks) with every `pre_wrap` hook applied."""
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.models.config_builder import build_transformer_config

    if device.type == "meta":
        # Shapes only: megatron would otherwise fill every weight on the CPU before the move.
        overrides = {"perform_initialization": False, **(overrides or {})}
    config = build_transformer_config(
        model_cfg,
        layout,
        spec=spec,
        device_type=device.type,
        precision=precision or PrecisionConfig(),
        recompute=recompute or RecomputeConfig(),
        **(overrides or {}),
    )
    chunks = build_model_chunks(model_cfg, config, spec, device)
    for hook in pre_wrap:
        chunks = hook(chunks)
    if not any(p.requires_grad for chunk in chunks for p in chunk.parameters()):
        raise ValueError("the model-build hooks left no parameter to train")
    return config, chunks


def wrap_for_training(
    config: TransformerConfig,
    chunks: List[torch.nn.Module],
    optim: OptimSection,
    total_tokens: int,
) -> TrainableModel:
    """megatron DDP around `chunks`, the optimizer over their trainable parameters, and the
    LR schedule over `total_tokens`."""
    from megatron_danube.training.optim import build_optimizer
    from megatron_danube.training.step import wrap_with_ddp

    wrapped = wrap_with_ddp(
        chunks,
        config,
        use_distributed_optimizer=optim.use_distributed_optimizer,
        overlap_grad_reduce=optim.overlap_grad_reduce,
    )
    optimizer, scheduler = build_optimizer(optim, wrapped, config, total_tokens)
    return TrainableModel(config, wrapped, optimizer, scheduler)
