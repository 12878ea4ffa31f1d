"""danube-plan: predict memory per GPU and throughput of every parallel layout the project
accepts for a model on N GPUs, and write the best one as a config `danube-train` reads.

    danube-plan --model danube-1.8b --gpu h100 --gpus 8 --seq-length 16384 --precision fp8

Predictions of a model (planning/): weights, gradients and optimizer state as megatron-core
allocates them, activations by the tensors a layer saves, step time from the trainer's FLOPs
at fractions of peak fitted to the throughput benchmark (`--calibrate` refits them).
"""

from __future__ import annotations

import json
import os
import sys

from megatron_danube.cli.common import report, run_command, summary
from megatron_danube.errors import DanubeConfigError

SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def token_count(text: str) -> int:
    """'1T', '300B', '2.5e11', '1048576' -> tokens."""
    raw = text.strip().upper()
    scale = SUFFIXES.get(raw[-1:], 1)
    try:
        value = float(raw[:-1] if scale != 1 else raw) * scale
    except ValueError:
        raise DanubeConfigError(f"token count {text!r}; write e.g. 1T, 300B or 1048576") from None
    if value <= 0:
        raise DanubeConfigError(f"token count {text!r} must be > 0")
    return int(value)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a preset (danube-1.8b) or a run config YAML")
    p.add_argument("--gpu", required=True, help="h100, h200 or a100-80g")
    p.add_argument("--gpus", required=True, type=int, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=None, help="default: the config's longest")
    p.add_argument("--global-batch-tokens", default=None, help="default: the config's, or 2^20")
    p.add_argument("--precision", default="bf16", help="bf16 or fp8 (the linear layers)")
    p.add_argument("--spec", default="te", help="te (GPU default) or local")
    p.add_argument("--tokens", default="1T", help="tokens to train, for the time to train")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", default=None, help="write the runnable plans, best first")
    p.add_argument("--write-config", default=None, help="write the best plan as a run config")
    p.add_argument("--calibrate", default=None, help="a danube-benchmark-throughput --json file")


def model_and_base(spec: str):
    """(model, base RunConfig or None) from a preset name or a config file."""
    from megatron_danube.models.presets import get_preset

    if spec.endswith((".yaml", ".yml")) or os.path.sep in spec:
        from megatron_danube.config.loader import load_config
        from megatron_danube.training.preflight import model_of

        cfg = load_config(spec)
        return model_of(cfg), cfg
    return get_preset(spec), None


def build_request(args):
    from megatron_danube.planning.hardware import get_gpu
    from megatron_danube.planning.search import Request
    from megatron_danube.planning.speed import Cluster

    model, base = model_and_base(args.model)
    gpu = get_gpu(args.gpu)
    if args.gpus < 1 or args.gpus_per_node < 1:
        raise DanubeConfigError(f"--gpus {args.gpus} and --gpus-per-node must be >= 1")
    if args.precision not in ("bf16", "fp8"):
        raise DanubeConfigError(f"--precision {args.precision!r}; choose bf16 or fp8")
    if args.spec not in ("te", "local"):
        raise DanubeConfigError(f"--spec {args.spec!r}; choose te or local")
    if args.precision == "fp8" and (gpu.peak_fp8_tflops is None or args.spec != "te"):
        raise DanubeConfigError(f"--precision fp8 needs FP8 hardware and --spec te ({gpu.name})")
    seq = args.seq_length or (max(s.seq_length for s in base.stages) if base else None)
    if not seq or seq < 1:
        raise DanubeConfigError("--seq-length is required with a preset (and must be >= 1)")
    if args.global_batch_tokens is not None:
        gbt = token_count(args.global_batch_tokens)
    else:
        gbt = base.train.global_batch_tokens if base else 2**20
    request = Request(
        model=model,
        cluster=Cluster(gpu, args.gpus, args.gpus_per_node),
        seq_length=seq,
        global_batch_tokens=gbt,
        precision=args.precision,
        spec=args.spec,
        train_tokens=token_count(args.tokens),
    )
    return request, base


def print_table(request, found, top: int, eff) -> None:
    c = request.cluster
    report(
        f"\n{request.model.name} on {c.gpus} x {c.gpu.name} ({c.gpus_per_node} a node), "
        f"sequence {request.seq_length}, {request.global_batch_tokens:,} tokens a step, "
        f"{request.precision}; predictions of the planning model (efficiency {eff.source})"
    )
    report(
        "| # | layout | micro-batch | dist. opt | recompute | GiB/GPU | tokens/s | per GPU | "
        "MFU | days/1T | step s (DP comm exposed) |"
    )
    report("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for i, plan in enumerate(found.ranked[:top], 1):
        lay, t = plan.layout, plan.time
        sharded = "yes" if lay.distributed_optimizer else "no"
        report(
            f"| {i} | {lay.label()} | {lay.micro_batch} | {sharded} "
            f"| {lay.recompute or '-'} | {plan.memory.total / 2**30:.1f} | {t.tokens_per_s:,.0f} "
            f"| {t.tokens_per_s / c.gpus:,.0f} | {t.mfu:.1%} | {1e12 / t.tokens_per_s / 86400:.1f} "
            f"| {t.total_s:.2f} ({t.dp_comm_exposed_s:.3f}) |"
        )
    report(f"{len(found.ranked)} layouts runnable, {len(found.refused)} refused")


def run(args) -> int:
    from megatron_danube.planning.efficiency import DEFAULT, calibrate
    from megatron_danube.planning.search import run_config, search

    request, base = build_request(args)
    eff = calibrate(args.calibrate) if args.calibrate else DEFAULT
    found = search(request, eff)
    if not found.ranked:
        reasons = sorted({p.refused for p in found.refused}, key=len)
        raise DanubeConfigError(
            f"no layout of {request.model.name} runs on {request.cluster.gpus} x "
            f"{request.cluster.gpu.name}; e.g. {reasons[0] if reasons else 'none enumerated'}"
        )
    print_table(request, found, args.top, eff)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([p.as_dict(request) for p in found.ranked], f, indent=1)
    if args.write_config:
        from megatron_danube.config.loader import save_config

        best = found.ranked[0]
        cfg = run_config(request, best.layout, base)
        t = best.time
        save_config(
            cfg,
            args.write_config,
            header=(
                f"danube-plan: {best.layout.label()}, micro-batch {best.layout.micro_batch}; "
                f"predicted {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.1%}, "
                f"{best.memory.total / 2**30:.1f} GiB per GPU on {request.cluster.gpus} x "
                f"{request.cluster.gpu.name}"
            ),
        )
    return 0


def command(argv=None) -> int:
    """Run with these arguments; the exit code (2 for bad input)."""
    return run_command("danube-plan", summary(__doc__), add_arguments, run, argv)


def main(argv=None) -> None:
    sys.exit(command(argv))


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
