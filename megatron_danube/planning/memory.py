"""Memory per GPU of a layout: the deterministic part exactly as megatron-core allocates it,
activations by the saved tensors of a layer.

Weights, gradients and optimizer state follow this project's build (`training/model_build.py`:
megatron DDP with `grad_reduce_in_fp32`, megatron's (distributed) optimizer): the DDP buffer of
each model chunk holds its parameters in reverse order, with the distributed optimizer each
parameter starting on a multiple of 64 elements and each bucket padded to a multiple of
lcm(DP, 128); the buffer's gradients are fp32; under the distributed optimizer the parameters
live in that buffer too, and each data-parallel rank owns one contiguous 1/DP of every bucket.
The optimizer holds, per element it updates, Adam's two fp32 moments, an fp32 main copy when
the parameters are not fp32, and (torch AdamW, the CPU's) a 4-byte step counter per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_danube.models.presets import DanubeModelConfig
from megatron_danube.planning.layout import PlanLayout

FP32 = 4
ADAM_MOMENTS_BYTES = 2 * FP32
STEP_COUNTER_BYTES = 4


# megatron DDP's default bucket when overlap_grad_reduce is on (DistributedDataParallel).
def default_bucket_size(dp: int) -> int:
    return max(40_000_000, 1_000_000 * dp)


# Beyond the tensors counted here: the CUDA context, cuBLAS/NCCL workspaces and the caching
# allocator's fragmentation (assumed, not measured): a layout fits when
# total x (1 + FRAGMENTATION) + RESERVED_BYTES <= the GPU's memory.
RESERVED_BYTES = 3 * 2**30
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class Build:
    """How the parameters are held: their element size, the layer spec, FP8, overlap."""

    param_bytes: int = 2
    """2 (bf16 on GPU) or 4 (fp32, the CPU build)."""
    spec: str = "te"
    """`te` (Transformer Engine, GPU) or `local` (pure PyTorch)."""
    fp8: bool = False
    overlap_grad_reduce: bool = False
    """On: the first chunk's buffer is cut into megatron's default buckets (on PP rank 0)."""


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def chunk_param_numels(model: DanubeModelConfig, tp: int, layers: int, first: bool, last: bool):
    """This rank's parameter sizes of one model chunk, in `named_parameters()` order."""
    h, kv = model.hidden_size, model.num_query_groups * model.head_dim
    vocab = model.padded_vocab_size // tp
    numels = [vocab * h] if first else []
    for _ in range(layers):
        numels += [
            h,  # input_layernorm (replicated over TP)
            h * (h // tp),  # linear_proj (row-parallel)
            (h + 2 * kv) // tp * h,  # linear_qkv (column-parallel)
            h,  # pre_mlp_layernorm
            2 * model.ffn_hidden_size // tp * h,  # linear_fc1 (gate and up)
            h * (model.ffn_hidden_size // tp),  # linear_fc2
        ]
    if last:
        numels += [h, vocab * h]  # final_layernorm, output_layer (untied)
    return numels


@dataclass
class DdpBuffer:
    """One chunk's megatron DDP param-and-grad buffer."""

    numel: int
    buckets: List[Tuple[int, int]]
    param_ranges: List[Tuple[int, int]]


def ddp_buffer(numels: List[int], dp: int, distributed: bool, bucket_size: Optional[int]):
    """The buffer megatron-core's `_ParamAndGradBuffer` lays out for these parameters."""
    align = math.lcm(dp, 128)

    def pad_end(end: int) -> int:
        return _pad(end, align) if distributed else end

    start = bucket_start = end = 0
    buckets, ranges, open_params = [], [], 0
    for numel in reversed(numels):  # backprop order
        if distributed:
            start = _pad(start, 64)
        end = start + numel
        ranges.append((start, end))
        open_params += 1
        if bucket_size is not None and end - bucket_start >= bucket_size:
            bucket_end = pad_end(end)
            buckets.append((bucket_start, bucket_end))
            bucket_start = start = bucket_end
            open_params = 0
        else:
            start = end
    if open_params:
        buckets.append((bucket_start, pad_end(end)))
    return DdpBuffer(buckets[-1][1] if buckets else 0, buckets, ranges)


def owned_elements(buffer: DdpBuffer, dp: int, dp_rank: int) -> Tuple[int, int]:
    """(parameter elements, parameter tensors touched) of `dp_rank`'s 1/DP of every bucket."""
    elements = tensors = 0
    for b_start, b_end in buffer.buckets:
        size = (b_end - b_start) // dp
        lo = b_start + dp_rank * size
        hi = lo + size
        for p_start, p_end in buffer.param_ranges:
            overlap = min(hi, p_end) - max(lo, p_start)
            if overlap > 0:
                elements += overlap
                tensors += 1
    return elements, tensors


@dataclass
class StaticMemory:
    """Bytes one rank holds for the whole run."""

    weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    """Adam's moments and the fp32 main copy (when the parameters are not fp32)."""
    optimizer_counters: int = 0
    """torch AdamW's step counter, one 4-byte tensor per parameter tensor it updates."""
    fp8_weight_copies: int = 0
    """FP8 copy of the linear weights (Transformer Engine; an estimate)."""

    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer_state
            + self.optimizer_counters
            + self.fp8_weight_copies
        )


def chunks_of_rank(model: DanubeModelConfig, layout: PlanLayout, pp_rank: int):
    """(layers, first, last) of each model chunk of `pp_rank` (interleaved: chunk v is the
    global stage v x PP + pp_rank)."""
    stages = layout.pp * layout.vpp
    layers = model.num_layers // stages
    out = []
    for v in range(layout.vpp):
        stage = v * layout.pp + pp_rank
        out.append((layers, stage == 0, stage == stages - 1))
    return out


def static_memory(
    model: DanubeModelConfig, layout: PlanLayout, build: Build, pp_rank: int, dp_rank: int
) -> StaticMemory:
    """Weights, DDP gradient buffer and optimizer state of one rank."""
    mem = StaticMemory()
    main_copy = FP32 if build.param_bytes != FP32 else 0
    for index, (layers, first, last) in enumerate(chunks_of_rank(model, layout, pp_rank)):
        numels = chunk_param_numels(model, layout.tp, layers, first, last)
        bucketed = build.overlap_grad_reduce and index == 0 and pp_rank == 0
        bucket = default_bucket_size(layout.dp) if bucketed else None
        buffer = ddp_buffer(numels, layout.dp, layout.distributed_optimizer, bucket)
        held = buffer.numel if layout.distributed_optimizer else sum(numels)
        mem.weights += held * build.param_bytes
        mem.gradients += buffer.numel * FP32
        if layout.distributed_optimizer:
            elements, tensors = owned_elements(buffer, layout.dp, dp_rank)
        else:
            elements, tensors = sum(numels), len(numels)
        mem.optimizer_state += elements * (ADAM_MOMENTS_BYTES + main_copy)
        mem.optimizer_counters += tensors * STEP_COUNTER_BYTES
        if build.fp8:
            norms = 2 * layers + (1 if last else 0)
            vocab = model.padded_vocab_size // layout.tp * model.hidden_size
            embeddings = vocab * (int(first) + int(last))
            mem.fp8_weight_copies += sum(numels) - norms * model.hidden_size - embeddings
    return mem


def layer_activation_bytes(
    model: DanubeModelConfig,
    tokens: int,
    seq_length: int,
    tp: int,
    sequence_parallel: bool,
    build: Build,
    recompute: Optional[str] = None,
) -> int:
    """Bytes one transformer layer keeps for its backward, for `tokens` = micro-batch x seq.

    `local` spec (measured exactly on the CPU, tests/planning): each RMSNorm keeps its input
    in fp32, the normalised value and its output; attention keeps the qkv projection's output
    (held by v), k and q after RoPE, its output and log-sum-exp; the MLP keeps fc1's output,
    SiLU's output, the product and fc2's input; RoPE's cos/sin per sequence. `te` spec (an
    estimate from Transformer Engine's saved tensors): each norm keeps its input and output,
    attention q, k, v after RoPE, output and log-sum-exp, the MLP fc1's output and SwiGLU's.
    `selective` drops the log-sum-exp (core attention recomputed); `full` keeps the layer's
    input only.
    """
    p = build.param_bytes
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * model.head_dim
    sp = tp if sequence_parallel else 1
    if recompute == "full":
        return p * tokens * h // sp
    heads = model.num_attention_heads // tp
    lse = 0 if recompute == "selective" else FP32 * tokens * heads
    if build.spec == "local":
        norms = 2 * (tokens * h // sp * (FP32 + 2 * p) + FP32 * tokens // sp)
        attention = p * tokens * (2 * h + (h + 2 * kv) + kv) // tp + lse
        mlp = p * tokens * (2 * f + 3 * f) // tp
        rope = 4 * seq_length * model.head_dim * p
        return norms + attention + mlp + rope
    norms = 2 * (2 * p * tokens * h // sp + FP32 * tokens // sp)
    attention = p * tokens * (h + 2 * kv + h) // tp + lse
    mlp = p * tokens * (2 * f + f) // tp
    return norms + attention + mlp


def logits_bytes(model: DanubeModelConfig, tokens: int, tp: int, build: Build) -> int:
    """The last stage's logits and the fp32 softmax of the vocab-parallel loss (an estimate)."""
    return tokens * (model.padded_vocab_size // tp) * (build.param_bytes + FP32)


def in_flight_layers(model: DanubeModelConfig, layout: PlanLayout, pp_rank: int, micro: int):
    """Layers whose activations `pp_rank` holds at once: 1F1B keeps PP - rank micro-batches,
    the interleaved schedule 2 (PP - rank - 1) + (VPP - 1) PP + 1 chunk-micro-batches (megatron
    `get_pp_rank_microbatches`), never more than there are."""
    stages = layout.pp * layout.vpp
    per_chunk = model.num_layers // stages
    if layout.pp == 1:
        return model.num_layers
    if layout.vpp == 1:
        return min(layout.pp - pp_rank, micro) * per_chunk
    warmup = 2 * (layout.pp - pp_rank - 1) + (layout.vpp - 1) * layout.pp
    return min(warmup + 1, micro * layout.vpp) * per_chunk


@dataclass
class MemoryEstimate:
    """The worst rank's bytes, by part."""

    parts: Dict[str, int] = field(default_factory=dict)
    pp_rank: int = 0

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def required(self) -> int:
        """What the GPU must have: the total, fragmentation and the reserve."""
        return int(self.total * (1 + FRAGMENTATION)) + RESERVED_BYTES


def estimate_memory(
    model: DanubeModelConfig,
    layout: PlanLayout,
    build: Build,
    seq_length: int,
    micro_batches: int,
) -> MemoryEstimate:
    """The largest per-rank total over the pipeline ranks (the last data-parallel rank, which
    holds the end padding, for the optimizer's share)."""
    tokens = layout.micro_batch * seq_length
    per_layer = layer_activation_bytes(
        model, tokens, seq_length, layout.tp, layout.sequence_parallel, build, layout.recompute
    )
    working = 0
    if layout.recompute == "full":  # one layer's full activations while it is recomputed
        working = layer_activation_bytes(
            model, tokens, seq_length, layout.tp, layout.sequence_parallel, build
        )
    worst = None
    for pp_rank in range(layout.pp):
        static = static_memory(model, layout, build, pp_rank, layout.dp - 1)
        parts = {
            "weights": static.weights,
            "gradients": static.gradients,
            "optimizer_state": static.optimizer_state + static.optimizer_counters,
            "fp8_weight_copies": static.fp8_weight_copies,
            "activations": in_flight_layers(model, layout, pp_rank, micro_batches) * per_layer
            + working,
            "logits": logits_bytes(model, tokens, layout.tp, build)
            if pp_rank == layout.pp - 1
            else 0,
        }
        estimate = MemoryEstimate(parts, pp_rank)
        if worst is None or estimate.total > worst.total:
            worst = estimate
    return worst
