"""Throughput and model-FLOPs accounting, and the metric sinks (stdout, TensorBoard, JSONL)."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from megatron_danube.models.presets import DanubeModelConfig

H100_BF16_DENSE_TFLOPS = 989.0


def flops_per_token(model: DanubeModelConfig, seq_length: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention (fwd + bwd).

    Attention is counted as full causal even under a sliding window (as the baselines do).
    """
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    kv = model.num_query_groups * model.head_dim
    matmul = L * (h * (h + 2 * kv) + h * h + 3 * h * f) + h * model.vocab_size
    attention = 6 * L * h * seq_length  # QK^T and AV, 2 FLOPs a MAC, halved by causality, x3
    return 6 * matmul + attention


class MetricsWriter:
    """Rank 0 writes: one JSON object a logged step to metrics.jsonl, TensorBoard scalars."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; metrics go to metrics.jsonl only", flush=True)

    def write(self, record: dict, step: int, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration",):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


class Throughput:
    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0
        self.steps = 0

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops
        self.steps += 1

    def rates(self, world_size: int, peak_tflops: Optional[float]) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tflops_per_gpu = self.flops / dt / world_size / 1e12
        out = {
            "tokens_per_s": self.tokens / dt,
            "tflops_per_gpu": tflops_per_gpu,
            "step_time_s": dt / max(self.steps, 1),
        }
        if peak_tflops:
            out["mfu"] = tflops_per_gpu / peak_tflops
        return out
