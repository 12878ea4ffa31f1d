"""Step time of a layout: compute at the calibrated fractions of peak, TP collectives over
NVLink, pipeline transfers and bubble, the data-parallel gradient reduction, the optimizer.

FLOPs are the trainer's (`training.metrics.flops_per_token`): its linear part at the linear
layers' rate, its attention part, scaled to the work the sliding window leaves, at the
attention rate. MFU counts the trainer's FLOPs against the dense BF16 peak, as the trainer does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_danube.models.presets import DanubeModelConfig
from megatron_danube.planning.efficiency import Efficiency, attention_work, gemm_factor
from megatron_danube.planning.hardware import GpuSpec, peak_tflops
from megatron_danube.planning.layout import PlanLayout
from megatron_danube.planning.memory import Build, static_memory

ACTIVATION_BYTES = 2  # BF16 activations on the wire (TP and PP)


@dataclass(frozen=True)
class Cluster:
    """The machines: GPU model, count, GPUs per node."""

    gpu: GpuSpec
    gpus: int
    gpus_per_node: int = 8


@dataclass
class StepTime:
    """Seconds of one optimizer step, by part, and what follows from them."""

    compute_s: float
    tp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_exposed_s: float
    dp_comm_s: float
    optimizer_s: float
    total_s: float
    tokens_per_s: float
    mfu: float

    def as_dict(self) -> dict:
        return asdict(self)


def _microbatch_compute(model, layout: PlanLayout, seq: int, precision: str, gpu, eff):
    """Seconds of one micro-batch (forward + backward, recomputation included) on the
    slowest pipeline rank (the last: it also computes the logits)."""
    from megatron_danube.training.metrics import flops_per_token

    tokens = layout.micro_batch * seq
    logits = 6 * model.hidden_size * model.vocab_size
    linear_layer = (flops_per_token(model, 0) - logits) / model.num_layers
    attention_layer = (
        (flops_per_token(model, seq) - flops_per_token(model, 0))
        * attention_work(model, seq)
        / model.num_layers
    )
    eff_linear = eff.linear_fp8 if precision == "fp8" else eff.linear_bf16
    # The logits at the same rate as the other linear layers, as `efficiency.calibrate` fits.
    linear_rate = peak_tflops(gpu, precision) * 1e12 * eff_linear * gemm_factor(eff, tokens)
    attention_rate = gpu.peak_bf16_tflops * 1e12 * eff.attention
    linear_s = linear_layer / linear_rate
    attention_s = attention_layer / attention_rate
    if layout.recompute == "full":  # the forward again: a third of forward + backward
        linear_s, attention_s = linear_s * 4 / 3, attention_s * 4 / 3
    elif layout.recompute == "selective":
        attention_s *= 4 / 3
    layers = model.num_layers // layout.pp
    per_token = layers * (linear_s + attention_s) + logits / linear_rate
    return tokens * per_token / layout.tp


def _tp_comm(model, layout: PlanLayout, seq: int, cluster: Cluster, eff) -> float:
    """Per micro-batch on one rank: per layer 4 all-gathers / reduce-scatters (SP; the same
    volume as 2 all-reduces) forward and 4 backward, 4 more under full recomputation."""
    if layout.tp == 1:
        return 0.0
    volume = layout.micro_batch * seq * model.hidden_size * ACTIVATION_BYTES
    per_op = (layout.tp - 1) / layout.tp * volume / (cluster.gpu.nvlink_gb_s * 1e9 * eff.link)
    ops = 8 + (4 if layout.recompute == "full" else 0)
    return model.num_layers // layout.pp * ops * per_op


def _pp_comm(model, layout: PlanLayout, seq: int, cluster: Cluster, eff) -> float:
    """Per micro-batch on one rank: each chunk receives activations forward and gradients
    backward; over the network when the next stage is TP x DP ranks away on another node."""
    if layout.pp == 1:
        return 0.0
    volume = layout.micro_batch * seq * model.hidden_size * ACTIVATION_BYTES / layout.tp
    across = layout.tp * layout.dp >= cluster.gpus_per_node
    bw = cluster.gpu.internode_gb_s if across else cluster.gpu.nvlink_gb_s
    return layout.vpp * 2 * (volume / (bw * 1e9 * eff.link) + eff.p2p_latency_s)


def _dp_comm(model, layout: PlanLayout, cluster: Cluster, build: Build, eff) -> float:
    """Gradient reduce-scatter (fp32) + parameter all-gather (distributed optimizer), or
    all-reduce; over the network when the DP group leaves the node."""
    if layout.dp == 1:
        return 0.0
    static = static_memory(model, layout, build, 0, 0)
    factor = (layout.dp - 1) / layout.dp
    across = layout.tp * layout.dp > cluster.gpus_per_node
    bw = (cluster.gpu.internode_gb_s if across else cluster.gpu.nvlink_gb_s) * 1e9 * eff.link
    if layout.distributed_optimizer:
        return factor * (static.gradients + static.weights) / bw
    return 2 * factor * static.gradients / bw


def step_time(
    model: DanubeModelConfig,
    layout: PlanLayout,
    cluster: Cluster,
    *,
    seq_length: int,
    global_batch_tokens: int,
    precision: str,
    build: Build,
    eff: Efficiency,
) -> StepTime:
    """One step: the pipeline's (m + (PP - 1) / VPP) micro-batch slots of the slowest rank,
    the DP reduction less what the last micro-batch's backward hides (overlap_grad_reduce;
    the distributed optimizer's parameter all-gather is not overlapped), the optimizer."""
    from megatron_danube.training.metrics import flops_per_token

    micro = global_batch_tokens // seq_length // (layout.micro_batch * layout.dp)
    compute = _microbatch_compute(model, layout, seq_length, precision, cluster.gpu, eff)
    tp = _tp_comm(model, layout, seq_length, cluster, eff)
    pp = _pp_comm(model, layout, seq_length, cluster, eff)
    slot = compute + tp + pp
    bubble = (layout.pp - 1) / layout.vpp * slot
    dp = _dp_comm(model, layout, cluster, build, eff)
    hidden = 0.0
    if layout.dp > 1:
        reduce = dp / 2 if layout.distributed_optimizer else dp
        hidden = min(reduce, 2 / 3 * compute)  # the backward of the last micro-batch
    static = static_memory(model, layout, build, 0, 0)
    updated = static.optimizer_state / (8 + (4 if build.param_bytes != 4 else 0))
    optimizer = updated * eff.optimizer_bytes_per_element / (cluster.gpu.hbm_tb_s * 1e12 * eff.hbm)
    total = micro * slot + bubble + (dp - hidden) + optimizer
    tokens_per_s = global_batch_tokens / total
    mfu = (
        flops_per_token(model, seq_length)
        * tokens_per_s
        / (cluster.gpus * cluster.gpu.peak_bf16_tflops * 1e12)
    )
    return StepTime(
        compute_s=micro * compute,
        tp_comm_s=micro * tp,
        pp_comm_s=micro * pp,
        bubble_s=bubble,
        dp_comm_exposed_s=dp - hidden,
        dp_comm_s=dp,
        optimizer_s=optimizer,
        total_s=total,
        tokens_per_s=tokens_per_s,
        mfu=mfu,
    )
