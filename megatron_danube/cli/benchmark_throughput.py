"""Training throughput of megatron_danube against HF transformers, measured in one process.

Every row runs a real training step (forward, backward, optimizer) on the same shapes and
random tokens:

  local              the plugin's step (megatron DDP + distributed optimizer, bf16 parameters,
                     fp32 master weights) with the pure-PyTorch spec (SDPA / FlexAttention)
  te                 the same with the Transformer Engine spec, bf16
  te-fp8-delayed     TE spec, FP8 linear layers, delayed scaling
  te-fp8-tensorwise  TE spec, FP8 linear layers, current (per-tensor) scaling
  hf-eager           HF MistralForCausalLM, sdpa, bf16 autocast, fused AdamW
  hf-compile         the same under torch.compile

For each sequence length a row takes the largest micro-batch of its candidates that fits.
One table: tokens/s, TFLOP/s, MFU against a bf16 matmul measured in the same run, peak
memory, ratio to HF + compile at the same length (HF eager where compile is not run);
`--json` writes every figure.

    python tools/benchmark_throughput.py                      # danube-1.8b on one GPU
    python tools/benchmark_throughput.py --tiny               # tiny shapes on the CPU (CI)
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from megatron_danube.cli.common import report, summary

logger = logging.getLogger("danube-benchmark-throughput")

ROW_KINDS = ("local", "te", "te-fp8-delayed", "te-fp8-tensorwise", "hf-eager", "hf-compile")
ROW_NAMES = {
    "local": "megatron_danube local spec, bf16",
    "te": "megatron_danube TE spec, bf16",
    "te-fp8-delayed": "megatron_danube TE spec, FP8 delayed",
    "te-fp8-tensorwise": "megatron_danube TE spec, FP8 tensorwise",
    "hf-eager": "HF MistralForCausalLM sdpa (eager)",
    "hf-compile": "HF MistralForCausalLM sdpa (compile)",
}
BASELINES = ("hf-compile", "hf-eager")  # the ratio column's reference, first one measured


@dataclass
class Row:
    kind: str
    seq: int
    micro_batch: Optional[int]
    tokens_per_s: Optional[float] = None
    tflops: Optional[float] = None
    mfu: Optional[float] = None
    peak_gib: Optional[float] = None
    vs_baseline: Optional[float] = None
    note: str = ""


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def release_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(n: int, dtype, device) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t) / steps


def random_tokens(vocab: int, seq: int, mbs: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seq)
    return torch.randint(0, vocab, (mbs, seq + 1), generator=g).to(device)


def megatron_runner(model_cfg, spec: str, params_dtype: str, fp8: Optional[str]):
    """The plugin's model, DDP and distributed optimizer, built once; returns make_step."""
    from megatron_danube.config import OptimSection, ParallelLayout, PrecisionConfig
    from megatron_danube.runtime.distributed import initialize
    from megatron_danube.training.model_build import build_model, wrap_for_training
    from megatron_danube.training.step import causal_lm_batch, train_step

    layout = ParallelLayout()
    rt = initialize(model_cfg, layout, spec=spec)
    config, chunks = build_model(
        model_cfg,
        layout=layout,
        spec=rt.spec,
        device=rt.device,
        precision=PrecisionConfig(params_dtype=params_dtype, fp8=fp8),
    )
    # The trainer's DDP and distributed optimizer; the LR schedule is not stepped here.
    model = wrap_for_training(config, chunks, OptimSection(lr=1e-4), total_tokens=1)
    chunks, optimizer = model.chunks, model.optimizer

    def make_step(seq: int, mbs: int):
        batch = causal_lm_batch(random_tokens(model_cfg.vocab_size, seq, mbs, rt.device))

        def step():
            train_step(
                chunks,
                optimizer,
                [iter([batch])],
                num_microbatches=1,
                seq_length=seq,
                micro_batch_size=mbs,
            )

        return step

    return make_step


def hf_runner(model_cfg, device, compiled: bool, autocast_dtype):
    from transformers import MistralForCausalLM

    from megatron_danube.models.hf_adapter import mistral_config

    model = MistralForCausalLM(mistral_config(model_cfg)).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=(0.9, 0.95),
        weight_decay=0.1,
        fused=device.type == "cuda",
    )
    forward = torch.compile(model) if compiled else model

    def make_step(seq: int, mbs: int):
        tokens = random_tokens(model_cfg.vocab_size, seq, mbs, device)

        def step():
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                loss = forward(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return make_step


def build_runner(kind: str, model_cfg, on_gpu: bool):
    device = torch.device("cuda" if on_gpu else "cpu")
    params = "bfloat16" if on_gpu else "float32"
    if kind == "local":
        return megatron_runner(model_cfg, "local", params, None)
    if kind == "te":
        return megatron_runner(model_cfg, "te", params, None)
    if kind.startswith("te-fp8-"):
        return megatron_runner(model_cfg, "te", params, kind[len("te-fp8-") :])
    if kind in ("hf-eager", "hf-compile"):
        return hf_runner(
            model_cfg, device, kind == "hf-compile", torch.bfloat16 if on_gpu else None
        )
    raise ValueError(kind)


def measure_row(kind, make_step, seq, candidates, args, model_cfg, peak) -> Row:
    """The row at the largest candidate micro-batch that fits."""
    from megatron_danube.training.metrics import flops_per_token

    too_big = []
    for mbs in candidates:
        release_memory()
        out_of_memory = False
        try:
            dt = time_steps(make_step(seq, mbs), args.warmup, args.steps)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True  # retried below, once this frame has let go of the tensors
        if out_of_memory:
            too_big.append(mbs)
            continue
        tokens = seq * mbs / dt
        tflops = tokens * flops_per_token(model_cfg, seq) / 1e12
        note = f"micro-batch {'/'.join(map(str, too_big))} out of memory" if too_big else ""
        if kind.startswith("te"):
            from megatron_danube.models.te_support import attention_backend

            note = "; ".join(n for n in (note, f"attention: {attention_backend()}") if n)
        return Row(kind, seq, mbs, tokens, tflops, tflops / peak, peak_gib(), note=note)
    return Row(kind, seq, None, note=f"out of memory at micro-batch {min(candidates)}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="danube-benchmark-throughput", description=summary(__doc__))
    p.add_argument("--model", default="danube-1.8b")
    p.add_argument("--seqs", default="2048,16384")
    p.add_argument(
        "--micro-batches",
        default="16/8,1",
        help="per sequence length, candidates largest first separated by '/': 16/8,1",
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated, from {', '.join(ROW_KINDS)}; default: all this machine can run",
    )
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (CI)")
    return p.parse_args(argv)


def default_rows(on_gpu: bool) -> List[str]:
    from megatron_danube.models.layer_specs import transformer_engine_available
    from megatron_danube.models.te_support import FP8_MIN_CAPABILITY, gpu_capability

    rows = ["hf-compile"] if on_gpu else []  # the baseline first: a run cut short keeps ratios
    if on_gpu and transformer_engine_available():
        rows.append("te")
        capability = gpu_capability()
        for recipe in ("delayed", "tensorwise"):
            if capability >= FP8_MIN_CAPABILITY[recipe]:
                rows.append(f"te-fp8-{recipe}")
    return rows + ["local", "hf-eager"]


def main(argv=None) -> int:
    from megatron_danube.logs import setup_logging

    setup_logging()
    run(argv)
    return 0


def run(argv=None) -> List[Row]:
    """Measure, print the table (and write the JSON); returns the rows."""
    from megatron_danube.models.presets import get_preset

    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.model, args.seqs, args.micro_batches = "danube-tiny", "64,128", "2,1"
        args.steps, args.warmup = max(1, min(args.steps, 2)), 1
        os.environ.setdefault("MASTER_PORT", "29651")
    model_cfg = get_preset(args.model)
    seqs = [int(s) for s in args.seqs.split(",")]
    candidates = [[int(m) for m in c.split("/")] for c in args.micro_batches.split(",")]
    if len(candidates) != len(seqs):
        raise SystemExit(
            "danube-benchmark-throughput: error: --micro-batches needs one entry per --seqs entry"
        )
    kinds = args.rows.split(",") if args.rows else default_rows(on_gpu)
    unknown = [k for k in kinds if k not in ROW_KINDS]
    if unknown:
        raise SystemExit(
            f"danube-benchmark-throughput: error: --rows {unknown[0]!r}; choose from "
            f"{', '.join(ROW_KINDS)}"
        )
    device = torch.device("cuda" if on_gpu else "cpu")
    peak = matmul_tflops(
        8192 if on_gpu else 1024, torch.bfloat16 if on_gpu else torch.float32, device
    )
    meta = {
        "model": model_cfg.name,
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "transformer_engine": _te_version(),
        "matmul_tflops": peak,
        "matmul": "bf16 8192^3" if on_gpu else "fp32 1024^3",
        "steps": args.steps,
        "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%d"),
        "baseline": next((b for b in BASELINES if b in kinds), None),
    }
    rows: List[Row] = []
    for kind in kinds:
        started = time.perf_counter()
        try:
            make_step = build_runner(kind, model_cfg, on_gpu)
            for seq, cands in zip(seqs, candidates):
                rows.append(measure_row(kind, make_step, seq, cands, args, model_cfg, peak))
        except Exception as exc:  # one failing row is reported, the others still measured
            logger.exception("row %s failed", kind)
            done = {r.seq for r in rows if r.kind == kind}
            rows += [
                Row(kind, seq, None, note=f"error: {type(exc).__name__}: {exc}"[:300])
                for seq in seqs
                if seq not in done
            ]
        make_step = None
        if kind == "hf-compile":
            torch._dynamo.reset()  # compiled graphs hold the model and its optimizer
        release_memory()
        logger.info("row %s: %.0f s", kind, time.perf_counter() - started)
        fill_ratios(rows, meta["baseline"])
        for row in rows[-len(seqs) :]:
            logger.info("measured %s", dataclasses.asdict(row))
        if args.json:  # after every row: a run cut short keeps what it measured
            write_json(args.json, meta, rows)
    print_table(rows, meta)
    return rows


def fill_ratios(rows: List[Row], baseline: Optional[str]) -> None:
    for row in rows:
        base = next((b for b in rows if b.kind == baseline and b.seq == row.seq), None)
        if row.tokens_per_s and base and base.tokens_per_s:
            row.vs_baseline = row.tokens_per_s / base.tokens_per_s


def write_json(path: str, meta: dict, rows: List[Row]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    os.replace(path + ".tmp", path)


def _te_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("transformer_engine")
    except Exception:
        return None


def print_table(rows: List[Row], meta: dict) -> None:
    report(
        f"\n{meta['model']} on {meta['device']}, torch {meta['torch']}, TE "
        f"{meta['transformer_engine'] or '-'}; matmul measured {meta['matmul_tflops']:.1f} "
        f"TFLOP/s ({meta['matmul']}); MFU against it"
    )
    base = ROW_NAMES[meta["baseline"]] if meta["baseline"] else "-"
    report(f"| what | seq | micro-batch | tokens/s | TFLOP/s | MFU | peak GiB | vs {base} | note |")
    report("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = ROW_NAMES[r.kind]
        if r.tokens_per_s is None:
            report(f"| {name} | {r.seq} | - | | | | | | {r.note} |")
            continue
        ratio = f"{r.vs_baseline:.2f}x" if r.vs_baseline else "-"
        mem = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "-"
        report(
            f"| {name} | {r.seq} | {r.micro_batch} | {r.tokens_per_s:,.0f} | {r.tflops:.2f} | "
            f"{r.mfu:.1%} | {mem} | {ratio} | {r.note} |"
        )


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
