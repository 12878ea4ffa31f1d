"""Throughput and model-FLOPs accounting, the per-step record, and the metric sinks (the
log, TensorBoard, metrics.jsonl)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, Optional

from megatron_danube.models.presets import DanubeModelConfig

H100_BF16_DENSE_TFLOPS = 989.0
logger = logging.getLogger(__name__)


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
        self._path = os.path.join(run_dir, "metrics.jsonl")
        self._jsonl = open(self._path, "a", buffering=1)
        self._tb_dir = None
        if tensorboard:
            try:
                import torch.utils.tensorboard  # noqa: F401

                # Made on the first record: a start that records nothing adds no events file.
                self._tb_dir = os.path.join(run_dir, "tensorboard")
            except ImportError:
                logger.warning("tensorboard is not installed; metrics go to metrics.jsonl only")

    def truncate_after(self, iteration: int) -> None:
        """Drop records past `iteration`: a resumed run writes those steps again, once."""
        if not self.enabled:
            return
        self._jsonl.close()
        kept = []
        with open(self._path) as f:
            for line in f:
                try:
                    if json.loads(line).get("iteration", 0) <= iteration:
                        kept.append(line)
                except ValueError:
                    pass  # a line cut short by a crash
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self._path)
        self._jsonl = open(self._path, "a", buffering=1)

    def write(self, record: dict, step: int, prefix: Optional[str] = "train") -> None:
        """One record; TensorBoard tags are `prefix/key` (None: the keys as they are)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is None and self._tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir)
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration",):
                    tag = key if prefix is None else f"{prefix}/{key}"
                    self._tb.add_scalar(tag, value, step)

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


class StepWindow:
    """Loss and grad norm averaged over the steps since the last record.

    A skipped step (non-finite loss or gradients) makes the window's figures NaN: a diverging
    run must never look like a loss of 0.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss, self.grad_norm, self.steps = 0.0, 0.0, 0
        self.reports = {}  # the loss function's reports, summed: jobs derive metrics from them

    def add(self, loss: float, grad_norm: float, reports=None) -> None:
        self.loss += loss
        self.grad_norm += grad_norm
        self.steps += 1
        for name, value in (reports or {}).items():
            self.reports[name] = self.reports.get(name, 0) + value.detach().cpu()

    def mean_loss(self) -> float:
        return self.loss / self.steps if self.steps else math.nan

    def mean_grad_norm(self) -> float:
        return self.grad_norm / self.steps if self.steps else math.nan


def step_record(
    iteration: int,
    consumed_tokens: int,
    labels: Dict[str, int],
    window: StepWindow,
    throughput: Throughput,
    *,
    lr: float,
    skipped_steps: int,
    world_size: int,
    peak_tflops: Optional[float],
    eta_s: float,
) -> dict:
    """The metrics record of a logged step; also logs it as one line."""
    rates = throughput.rates(world_size, peak_tflops)
    record = {
        "iteration": iteration,
        "consumed_tokens": consumed_tokens,
        **labels,
        "loss": window.mean_loss(),
        "lr": lr,
        "grad_norm": window.mean_grad_norm(),
        "skipped_steps": skipped_steps,
        "memory_gib": memory_gib(),
        "eta_s": eta_s,
        **rates,
    }
    logger.info(
        "iter %6d | tokens %s | loss %.4f | lr %.3e | grad %.3f | %s tok/s | %.2f TFLOP/s/GPU%s"
        " | mem %.1f GiB | ETA %.1f min",
        iteration,
        f"{consumed_tokens:,}",
        record["loss"],
        lr,
        record["grad_norm"],
        f"{rates['tokens_per_s']:,.0f}",
        rates["tflops_per_gpu"],
        f" | MFU {rates['mfu']:.1%}" if "mfu" in rates else "",
        record["memory_gib"],
        eta_s / 60,
    )
    return record


def memory_gib() -> float:
    """Peak GPU memory allocated, or this process's resident memory on the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
