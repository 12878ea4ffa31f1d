"""Move whole (TP=1, PP=1) weights in and out of this rank's sharded model chunks.

Names are the full model's `named_parameters()` names in the local spec's spelling, e.g.
`decoder.layers.17.mlp.linear_fc1.weight` (global layer index); a TE-spec model's fused-norm
weights (`linear_qkv.layer_norm_weight`) go by their local names (`input_layernorm.weight`), so
weights move between the specs unchanged. Megatron's tensor-parallel
parameters carry `partition_dim`; the fused SwiGLU `linear_fc1` holds [gate; up] and is split
per half, so each TP rank owns [gate_r; up_r], the layout megatron's own checkpoints use.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Tuple

import torch
from megatron.core import parallel_state

from megatron_danube.models.hf_adapter import local_name

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def _global_names(chunk: torch.nn.Module) -> Iterator[Tuple[str, str, torch.nn.Parameter]]:
    module = getattr(chunk, "module", chunk)  # unwrap megatron DDP
    for name, param in module.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = module.decoder.layers[int(match.group(2))]
            name_global = f"{match.group(1)}{layer.layer_number - 1}{match.group(3)}"
        else:
            name_global = name
        yield name, local_name(name_global), param


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def shard_for_this_rank(name: str, full: torch.Tensor, param: torch.nn.Parameter, gated: bool):
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    dim = param.partition_dim
    if gated and _is_gated_fc1(name):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def load_full_weights(chunks: List[torch.nn.Module], full: Dict[str, torch.Tensor], gated=True):
    """Copy this rank's slice of each full tensor into the chunks' parameters."""
    for chunk in chunks:
        for _, name, param in _global_names(chunk):
            if name not in full:
                raise KeyError(f"full weights have no tensor {name!r}")
            src = shard_for_this_rank(name, full[name], param, gated)
            if src.shape != param.shape:
                raise ValueError(
                    f"{name}: slice {tuple(src.shape)} != parameter {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(src)


def local_slices(
    chunks: List[torch.nn.Module], full: Dict[str, torch.Tensor], gated=True, partial=False
) -> Iterator[Tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(global name, local parameter, this rank's slice of the full tensor) for every parameter
    (`partial`: for those `full` has, e.g. only the trained ones)."""
    for chunk in chunks:
        for _, name, param in _global_names(chunk):
            if partial and name not in full:
                continue
            yield name, param, shard_for_this_rank(name, full[name], param, gated)


def full_named_parameters(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A TP=1/PP=1 model's parameters under their global names (detached clones)."""
    return {name: p.detach().clone() for _, name, p in _global_names(model)}
