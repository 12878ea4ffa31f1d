"""The efficiency constants of the step-time model, in one place, and their calibration from
the throughput benchmark's JSON (`danube-benchmark-throughput --json`).

The tensor-core fractions are fitted to measurements; the rest are stated assumptions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import List

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.presets import get_preset
from megatron_danube.planning.hardware import get_gpu, gpu_of_device, peak_tflops


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the hardware's peaks."""

    linear_bf16: float
    """Linear layers (and the logits) in BF16: fraction of the dense BF16 peak."""
    linear_fp8: float
    """Linear layers under FP8 (Transformer Engine): fraction of the dense FP8 peak."""
    attention: float
    """Attention (the work the window leaves) in BF16: fraction of the BF16 peak."""
    gemm_half_tokens: int = 256
    """Assumed: a GEMM over M tokens runs at M / (M + this) of its large-M rate."""
    link: float = 0.8
    """Assumed: NCCL's achieved fraction of NVLink and network bandwidth."""
    p2p_latency_s: float = 20e-6
    """Assumed: latency of one pipeline send/receive."""
    hbm: float = 0.7
    """Assumed: the optimizer step's achieved fraction of memory bandwidth."""
    optimizer_bytes_per_element: int = 30
    """The optimizer step's memory traffic per element: fp32 main weight and both moments
    read and written (24), the fp32 gradient read (4), the BF16 weight written (2)."""
    source: str = ""


# Fitted with `calibrate` to docs/measurements/2026-12-04-h200-run2.json, measured for this
# project on one H200 (TE spec: the `te` rows at 2048 x 16 and 16384 x 1 for BF16 linear and
# attention, the `te-fp8-delayed` rows for FP8).
DEFAULT = Efficiency(
    linear_bf16=0.538,
    linear_fp8=0.374,
    attention=0.270,
    source="fitted to docs/measurements/2026-12-04-h200-run2.json (one H200, TE spec)",
)

BF16_KINDS = ("te", "local")
FP8_KINDS = ("te-fp8-delayed", "te-fp8-tensorwise")


def gemm_factor(eff: Efficiency, tokens: int) -> float:
    return tokens / (tokens + eff.gemm_half_tokens)


def attention_work(model, seq_length: int) -> float:
    """The fraction of full-causal attention work a sliding window leaves."""
    window = model.sliding_window
    if window is None or window >= seq_length:
        return 1.0
    keys = window * (window + 1) / 2 + (seq_length - window) * window
    return keys / (seq_length * (seq_length + 1) / 2)


def _rows(data: dict, kinds) -> List[dict]:
    for kind in kinds:
        rows = [r for r in data["rows"] if r["kind"] == kind and r.get("tokens_per_s")]
        if rows:
            return rows
    return []


def _terms(row: dict, model, gpu, precision: str, eff: Efficiency):
    """(linear seconds per token at efficiency 1, attention seconds at 1, measured seconds)
    of one benchmark row; the measured time less the optimizer step's share."""
    from megatron_danube.training.metrics import flops_per_token

    seq, mbs = row["seq"], row["micro_batch"]
    linear = flops_per_token(model, 0)
    attention = (flops_per_token(model, seq) - linear) * attention_work(model, seq)
    peak = peak_tflops(gpu, precision) * 1e12
    a = linear / (peak * gemm_factor(eff, seq * mbs))
    b = attention / (gpu.peak_bf16_tflops * 1e12)
    optimizer = (
        model.num_parameters(padded_vocab=True)
        * eff.optimizer_bytes_per_element
        / (gpu.hbm_tb_s * 1e12 * eff.hbm)
    )
    return a, b, 1.0 / row["tokens_per_s"] - optimizer / (seq * mbs)


def calibrate(path: str, base: Efficiency = DEFAULT) -> Efficiency:
    """`base` with its tensor-core fractions fitted to a benchmark JSON: BF16 linear and
    attention from two BF16 rows (TE, else local), FP8 linear from the FP8 rows."""
    try:
        with open(path) as f:
            data = json.load(f)
        data = data.get("benchmark", data)  # docs/measurements/ nest it under `benchmark`
        meta = data["meta"]
        model, gpu = get_preset(meta["model"]), get_gpu(gpu_of_device(meta["device"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DanubeConfigError(
            f"--calibrate {path}: not a throughput benchmark JSON ({exc})"
        ) from None
    bf16 = [_terms(r, model, gpu, "bf16", base) for r in _rows(data, BF16_KINDS)]
    if len({round(a / b, 9) for a, b, _ in bf16}) < 2:
        raise DanubeConfigError(
            f"--calibrate {path}: needs BF16 rows (te or local) at two sequence lengths"
        )
    (a1, b1, t1), (a2, b2, t2) = bf16[0], bf16[-1]
    det = a1 * b2 - a2 * b1
    inv_linear, inv_attention = (t1 * b2 - t2 * b1) / det, (a1 * t2 - a2 * t1) / det
    if inv_linear <= 0 or inv_attention <= 0:
        raise DanubeConfigError(f"--calibrate {path}: the BF16 rows give no positive fit")
    fitted = replace(
        base,
        linear_bf16=1 / inv_linear,
        attention=1 / inv_attention,
        source=f"fitted to {path} ({meta['device']})",
    )
    fp8 = [_terms(r, model, gpu, "fp8", base) for r in _rows(data, FP8_KINDS)]
    if fp8 and gpu.peak_fp8_tflops:
        residual = [(a, t - b * inv_attention) for a, b, t in fp8]
        inv = sum(a * r for a, r in residual) / sum(a * a for a, _ in residual)
        if inv > 0:
            fitted = replace(fitted, linear_fp8=1 / inv)
    return fitted
