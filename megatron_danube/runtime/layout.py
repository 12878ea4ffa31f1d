"""The parallel layout of a run, and its validation before anything is built."""

from __future__ import annotations

from typing import Optional

from megatron_danube.config.sections import ParallelLayout
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.presets import DanubeModelConfig


def validate_layout(
    layout: ParallelLayout,
    model: DanubeModelConfig,
    world_size: int,
    *,
    spec: str = "local",
    seq_length: Optional[int] = None,
) -> None:
    """Raise a one-line DanubeConfigError naming the conflicting numbers."""
    tp, pp, vpp, cp = (
        layout.tensor_parallel,
        layout.pipeline_parallel,
        layout.virtual_pipeline,
        layout.context_parallel,
    )
    for name, value in (
        ("parallel.tensor_parallel", tp),
        ("parallel.pipeline_parallel", pp),
        ("parallel.virtual_pipeline", vpp),
        ("parallel.context_parallel", cp),
    ):
        if not isinstance(value, int) or value < 1:
            raise DanubeConfigError(f"{name} must be an integer >= 1, got {value!r}")
    if world_size % layout.model_parallel:
        raise DanubeConfigError(
            f"world size {world_size} is not divisible by TP({tp}) x PP({pp}) x CP({cp}) = "
            f"{layout.model_parallel}; launch a multiple of {layout.model_parallel} processes "
            f"or change the layout"
        )
    if model.num_attention_heads % tp:
        raise DanubeConfigError(
            f"num_attention_heads {model.num_attention_heads} is not divisible by "
            f"tensor_parallel {tp}; choose TP among the divisors of both head counts"
        )
    if model.num_query_groups % tp:
        raise DanubeConfigError(
            f"num_query_groups (KV heads) {model.num_query_groups} is not divisible by "
            f"tensor_parallel {tp}; use TP <= {model.num_query_groups} dividing it"
        )
    if model.ffn_hidden_size % tp:
        raise DanubeConfigError(
            f"ffn_hidden_size {model.ffn_hidden_size} is not divisible by tensor_parallel {tp}"
        )
    if model.padded_vocab_size % tp:
        raise DanubeConfigError(
            f"padded vocab {model.padded_vocab_size} is not divisible by tensor_parallel "
            f"{tp}; raise model.vocab_pad_multiple to a multiple of {tp}"
        )
    if vpp > 1 and pp == 1:
        raise DanubeConfigError(
            f"virtual_pipeline {vpp} needs pipeline_parallel > 1; set virtual_pipeline=1"
        )
    if model.num_layers % (pp * vpp):
        raise DanubeConfigError(
            f"num_layers {model.num_layers} is not divisible by pipeline_parallel {pp} x "
            f"virtual_pipeline {vpp} = {pp * vpp}"
        )
    if layout.sequence_parallel and tp == 1:
        raise DanubeConfigError(
            "sequence_parallel needs tensor_parallel > 1; set parallel.sequence_parallel=false"
        )
    if cp > 1 and spec != "te":
        raise DanubeConfigError(
            f"context_parallel {cp} needs the Transformer Engine spec (model.spec=te on GPU "
            f"with transformer_engine installed); the local spec supports CP=1 only"
        )
    if seq_length is not None:
        if seq_length > model.max_position_embeddings:
            raise DanubeConfigError(
                f"sequence length {seq_length} exceeds model {model.name}'s context "
                f"{model.max_position_embeddings}"
            )
        if layout.sequence_parallel and seq_length % tp:
            raise DanubeConfigError(
                f"sequence length {seq_length} is not divisible by tensor_parallel {tp}, "
                f"required by sequence_parallel"
            )
        if cp > 1 and seq_length % (2 * cp):
            raise DanubeConfigError(
                f"sequence length {seq_length} is not divisible by 2 x context_parallel = {2 * cp}"
            )
