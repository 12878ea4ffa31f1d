"""LoRA adapters on megatron's parallel linear layers, one per HF projection, exact under TP.

Each targeted layer gets an adapter module next to it (`self_attention.lora_linear_qkv`,
`mlp.lora_linear_fc2`, ...), so the base layer keeps its parameter names and checkpoints; a
forward hook adds `scaling * B(A(x))` to the base output. A fused layer carries one adapter per
HF projection (`linear_qkv`: q, k, v; `linear_fc1`: gate, up), each with its own A and B, as
HF PEFT has them: the same initialisation trains the same way, and import and export are exact.

Tensor parallelism follows the base layer:
* column-parallel base (qkv, fc1): A is whole on every rank, B is split like the base output
  (q, k and v per query group; gate and up per half). The adapter reads the whole input (under
  sequence parallelism, gathered); A's output passes `copy_to_tensor_model_parallel_region`,
  whose backward all-reduces, so A's gradient is whole on every rank.
* row-parallel base (proj, fc2): A is split like the base input, its partial products are
  all-reduced, B is whole; under sequence parallelism the result is scattered along the
  sequence, as the base output is.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.utils import divide

from megatron_danube.errors import DanubeConfigError

# megatron layer -> (where it lives in a TransformerLayer, parallel kind, HF projections).
LAYERS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "linear_qkv": ("self_attention", "column", ("q_proj", "k_proj", "v_proj")),
    "linear_proj": ("self_attention", "row", ("o_proj",)),
    "linear_fc1": ("mlp", "column", ("gate_proj", "up_proj")),
    "linear_fc2": ("mlp", "row", ("down_proj",)),
}
PROJECTION_LAYER = {proj: layer for layer, (_, _, projs) in LAYERS.items() for proj in projs}
ADAPTER_PREFIX = "lora_"  # the adapter of `linear_qkv` is the sibling module `lora_linear_qkv`


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: Dict[str, Tuple[str, ...]]
    """megatron layer -> the HF projections adapted in it."""
    seed: int = 1234

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def of(cls, recorded: dict) -> LoraSettings:
        """The settings a LoRA run's checkpoints record (for loading them; no dropout)."""
        targets = recorded.get("targets") or list(LAYERS)
        return cls(recorded["rank"], recorded["alpha"], 0.0, resolve_targets(targets))


def resolve_targets(target_modules: Sequence[str], exclude_modules: Sequence[str] = ()):
    """megatron layer -> adapted HF projections, from megatron or HF names (a megatron name
    takes every projection of its layer); an unknown name is a one-line error."""
    known = list(LAYERS) + list(PROJECTION_LAYER)

    def projections(names: Sequence[str], key: str) -> List[str]:
        out = []
        for name in names:
            if name in LAYERS:
                out += LAYERS[name][2]
            elif name in PROJECTION_LAYER:
                out.append(name)
            else:
                raise DanubeConfigError(
                    f"peft.{key}: {name!r} names no layer; choose from {', '.join(known)}"
                )
        return out

    excluded = set(projections(exclude_modules, "exclude_modules"))
    chosen = [p for p in projections(target_modules, "target_modules") if p not in excluded]
    if not chosen:
        raise DanubeConfigError(
            "peft.target_modules selects nothing (after exclude_modules); name at least one of "
            + ", ".join(known)
        )
    targets: Dict[str, Tuple[str, ...]] = {}
    for layer, (_, _, projs) in LAYERS.items():
        kept = tuple(p for p in projs if p in chosen)
        if kept:
            targets[layer] = kept
    return targets


def _segments(layer: str, model_cfg, tp: int) -> Tuple[int, Dict[str, int]]:
    """(groups in this rank's slice of the base output, rows per group of each projection)."""
    if layer == "linear_qkv":
        per_group = model_cfg.num_attention_heads // model_cfg.num_query_groups
        d = model_cfg.head_dim
        return divide(model_cfg.num_query_groups, tp), {
            "q_proj": per_group * d,
            "k_proj": d,
            "v_proj": d,
        }
    if layer == "linear_fc1":
        half = divide(model_cfg.ffn_hidden_size, tp)
        return 1, {"gate_proj": half, "up_proj": half}
    return 1, {}


def _seeded_kaiming(shape, seed_text: str) -> torch.Tensor:
    """PEFT's A initialisation (kaiming-uniform, a=sqrt(5)), the same on every rank."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed % 2**63)
    bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform with a=sqrt(5): 1/sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def _check_shapes(name: str, a, b, a_shape, b_shape) -> None:
    if tuple(a.shape) != a_shape or tuple(b.shape) != b_shape:
        raise DanubeConfigError(
            f"adapter {name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit this model "
            f"(A {a_shape}, B {b_shape} at rank {a_shape[0]}); use an adapter trained on this "
            f"model with peft.rank={a_shape[0]}"
        )


def _mark_split(param: torch.nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class LoRAProjection(torch.nn.Module):
    """One HF projection's A [rank, in] and B [out, rank], as this rank holds them."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, split: str):
        super().__init__()
        self.lora_A = torch.nn.Parameter(a)
        self.lora_B = torch.nn.Parameter(b)
        if split == "column":
            _mark_split(self.lora_B, 0)
        else:
            _mark_split(self.lora_A, 1)


class LoRAAdapter(torch.nn.Module):
    """The adapters of one base layer; `delta(x)` is what they add to its output."""

    def __init__(
        self,
        base,
        layer: str,
        settings: LoraSettings,
        model_cfg,
        layer_index: int,
        initial: Optional[Dict[str, torch.Tensor]] = None,
    ):
        super().__init__()
        self.layer, self.kind = layer, LAYERS[layer][1]
        self.scaling = settings.scaling
        self.dropout = settings.dropout
        self.enabled = True
        self.sequence_parallel = bool(getattr(base, "sequence_parallel", False))
        tp = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        dtype, device = base.weight.dtype, base.weight.device
        self.groups, rows = _segments(layer, model_cfg, tp)
        self.order = [p for p in LAYERS[layer][2]]  # output order inside a group
        self.sizes = rows
        self.projections = list(settings.targets[layer])
        r = settings.rank
        block = LAYERS[layer][0]
        for proj in self.projections:
            name = f"decoder.layers.{layer_index}.{block}.{ADAPTER_PREFIX}{layer}.{proj}"
            if initial is not None:  # whole tensors (an imported adapter): this rank's slice
                a, b = initial[f"{name}.lora_A"], initial[f"{name}.lora_B"]
                out_full = tp * self.groups * rows[proj] if self.kind == "column" else None
                _check_shapes(name, a, b, (r, base.input_size), (out_full or base.output_size, r))
            else:
                a = _seeded_kaiming((r, base.input_size), f"{settings.seed}|{layer_index}|{proj}")
                b = None
            if self.kind == "column":
                out_local = self.groups * rows[proj]
                b = torch.zeros(out_local, r) if b is None else b.chunk(tp, dim=0)[rank]
            else:
                a = a.chunk(tp, dim=1)[rank]
                b = torch.zeros(base.output_size, r) if b is None else b
            module = LoRAProjection(a.to(device, dtype), b.to(device, dtype), self.kind)
            setattr(self, proj, module)

    def _projection(self, proj: str) -> LoRAProjection:
        return getattr(self, proj)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        if self.kind == "row":
            p = self._projection(self.projections[0])
            h = reduce_from_tensor_model_parallel_region(F.linear(x, p.lora_A))
            out = F.linear(h, p.lora_B) * self.scaling
            return scatter_to_sequence_parallel_region(out) if self.sequence_parallel else out
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        pieces = []
        for proj in self.order:
            rows = self.sizes[proj]
            if proj in self.projections:
                p = self._projection(proj)
                h = copy_to_tensor_model_parallel_region(F.linear(x, p.lora_A))
                piece = F.linear(h, p.lora_B) * self.scaling
            else:  # a projection of the fused layer that is not adapted
                piece = x.new_zeros(*x.shape[:-1], self.groups * rows)
            pieces.append(piece.unflatten(-1, (self.groups, rows)))
        return torch.cat(pieces, dim=-1).flatten(-2)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Split tensors as the dist checkpoint's shards, the rest replicated (with the layer
        offsets of the transformer block)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axes = {}
        for proj in self.projections:
            axes[f"{proj}.lora_B" if self.kind == "column" else f"{proj}.lora_A"] = (
                0 if self.kind == "column" else 1
            )
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(state, prefix, axes, sharded_offsets)


def _adapt_output(adapter: LoRAAdapter):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        out, bias = output
        return out + adapter.delta(args[0]), bias

    return hook


def _layers(chunk) -> Iterator:
    module = getattr(chunk, "module", chunk)
    decoder = getattr(module, "decoder", None)
    yield from (decoder.layers if decoder is not None else ())


def apply_lora(
    chunks: List[torch.nn.Module],
    model_cfg,
    settings: LoraSettings,
    initial: Optional[Dict[str, torch.Tensor]] = None,
):
    """Add the adapters to every transformer layer of `chunks` and freeze everything else
    (no gradient, so no DDP buffer and no optimizer state for the base weights). `initial`:
    whole A and B tensors by megatron name (an imported HF PEFT adapter) instead of PEFT's
    initialisation."""
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad = False
        for layer in _layers(chunk):
            for name in settings.targets:
                parent = getattr(layer, LAYERS[name][0])
                base = getattr(parent, name)
                adapter = LoRAAdapter(
                    base, name, settings, model_cfg, layer.layer_number - 1, initial
                )
                setattr(parent, ADAPTER_PREFIX + name, adapter)
                base.register_forward_hook(_adapt_output(adapter))
    return chunks


def is_adapter_name(name: str) -> bool:
    """Whether a parameter or checkpoint key belongs to a LoRA adapter."""
    return f".{ADAPTER_PREFIX}linear_" in name


def adapters(chunks) -> Iterator[LoRAAdapter]:
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, LoRAAdapter):
                yield module


@contextlib.contextmanager
def adapters_disabled(chunks):
    """The base model: every adapter off inside the block (DPO's reference pass)."""
    found = list(adapters(chunks))
    for adapter in found:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in found:
            adapter.enabled = True


def lora_parameter_count(chunks) -> int:
    return sum(p.numel() for a in adapters(chunks) for p in a.parameters())


# ---------------------------------------------------------------------------- HF PEFT names
_HF_BLOCK = {"self_attention": "self_attn", "mlp": "mlp"}
HF_PEFT_PREFIX = "base_model.model.model.layers."


def hf_peft_name(name: str) -> str:
    """`decoder.layers.3.self_attention.lora_linear_qkv.q_proj.lora_A` ->
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (PEFT's file names)."""
    _, _, layer, block, _adapter, proj, which = name.split(".")
    return f"{HF_PEFT_PREFIX}{layer}.{_HF_BLOCK[block]}.{proj}.{which}.weight"


def mcore_lora_name(hf_name: str) -> str:
    """The reverse of `hf_peft_name`; PEFT's in-memory names (`.lora_A.default.weight`) too."""
    parts = hf_name.removeprefix(HF_PEFT_PREFIX).replace(".default.", ".").split(".")
    layer, block, proj, which = parts[0], parts[1], parts[2], parts[3]
    megatron_layer = PROJECTION_LAYER[proj]
    block = LAYERS[megatron_layer][0]
    return f"decoder.layers.{layer}.{block}.{ADAPTER_PREFIX}{megatron_layer}.{proj}.{which}"
