"""Training throughput of megatron_danube against HF transformers, measured in one process.

For each sequence length: the plugin's real training step (megatron DDP + distributed
optimizer, bf16 parameters with fp32 master weights on GPU) and the baseline (HF
MistralForCausalLM, sdpa, bf16 autocast, fused AdamW; eager and torch.compile) on the same
shapes and random tokens. One table: tokens/s, TFLOP/s, MFU against a bf16 matmul measured in
the same run, peak memory, ratio to the baseline.

    python tools/benchmark_throughput.py                      # danube-1.8b on one GPU
    python tools/benchmark_throughput.py --tiny               # tiny shapes on the CPU (CI)
"""

import argparse
import gc
import os
import time

import torch  # noqa: E402

from megatron_danube.cli.common import report


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak():
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


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t) / steps


def plugin_runner(model_cfg, params_dtype: str):
    """Build the plugin's model, DDP and distributed optimizer once; return (step_fn, cleanup)."""
    from megatron_danube.config import OptimSection, ParallelLayout, PrecisionConfig
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.runtime.distributed import initialize
    from megatron_danube.training.optim import make_optimizer
    from megatron_danube.training.step import train_step, wrap_with_ddp

    layout = ParallelLayout()
    rt = initialize(model_cfg, layout, spec="auto")
    config = build_transformer_config(
        model_cfg,
        layout,
        spec=rt.spec,
        device_type=rt.device.type,
        precision=PrecisionConfig(params_dtype=params_dtype),
    )
    chunks = wrap_with_ddp(
        build_model_chunks(model_cfg, config, rt.spec, rt.device),
        config,
        use_distributed_optimizer=True,
    )
    optimizer = make_optimizer(OptimSection(lr=1e-4), chunks, config)

    def make_step(seq: int, mbs: int):
        g = torch.Generator(device="cpu").manual_seed(seq)
        tokens = torch.randint(0, model_cfg.vocab_size, (mbs, seq + 1), generator=g).to(rt.device)
        batch = {
            "tokens": tokens[:, :-1],
            "labels": tokens[:, 1:],
            "loss_mask": torch.ones(mbs, seq, device=rt.device),
            "position_ids": torch.arange(seq, device=rt.device).expand(mbs, seq),
        }

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

    return rt, make_step, (chunks, optimizer)


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
        g = torch.Generator(device="cpu").manual_seed(seq)
        tokens = torch.randint(0, model_cfg.vocab_size, (mbs, seq + 1), generator=g).to(device)

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

    return make_step, (model, optimizer, forward)


def main(argv=None) -> int:
    from megatron_danube.logs import setup_logging

    setup_logging()
    run(argv)
    return 0


def run(argv=None) -> list:
    """Measure and print the table; returns its rows."""
    p = argparse.ArgumentParser(
        prog="danube-benchmark-throughput", description=__doc__.splitlines()[0]
    )
    p.add_argument("--model", default="danube-1.8b")
    p.add_argument("--seqs", default="2048,8192,16384")
    p.add_argument("--micro-batches", default="8,1,1", help="micro-batch per sequence length")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baselines", default="eager,compile", help="HF variants: eager, compile")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (CI)")
    args = p.parse_args(argv)

    from megatron_danube.models.presets import get_preset
    from megatron_danube.training.metrics import flops_per_token

    on_gpu = torch.cuda.is_available() and not args.tiny
    if args.tiny:
        args.model, args.seqs, args.micro_batches = "danube-tiny", "64,128", "2,1"
        args.steps, args.warmup = max(1, min(args.steps, 2)), 1
        os.environ.setdefault("MASTER_PORT", "29651")
    model_cfg = get_preset(args.model)
    seqs = [int(s) for s in args.seqs.split(",")]
    mbs = [int(m) for m in args.micro_batches.split(",")]
    if len(mbs) != len(seqs):
        raise SystemExit(
            "danube-benchmark-throughput: error: --micro-batches needs one value per --seqs entry"
        )
    device = torch.device("cuda" if on_gpu else "cpu")
    peak_dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = matmul_tflops(8192 if on_gpu else 1024, peak_dtype, device)
    rows = []

    def measure(name, make_step, seq, mb):
        reset_peak()
        try:
            dt = time_steps(make_step(seq, mb), args.warmup, args.steps)
        except torch.cuda.OutOfMemoryError:
            rows.append((name, seq, mb, None, None, None, "out of memory"))
            return
        tokens = seq * mb / dt
        tflops = tokens * flops_per_token(model_cfg, seq) / 1e12
        rows.append((name, seq, mb, tokens, tflops, tflops / peak, peak_gib()))

    rt, plugin_step, keep = plugin_runner(model_cfg, "bfloat16" if on_gpu else "float32")
    for seq, mb in zip(seqs, mbs):
        measure(f"megatron_danube ({rt.spec} spec)", plugin_step, seq, mb)
    del keep, plugin_step
    for variant in args.baselines.split(","):
        make_step, keep = hf_runner(
            model_cfg, device, variant == "compile", torch.bfloat16 if on_gpu else None
        )
        for seq, mb in zip(seqs, mbs):
            measure(f"HF MistralForCausalLM sdpa ({variant})", make_step, seq, mb)
        del keep, make_step

    device_name = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    report(
        f"\n{model_cfg.name} on {device_name}, torch {torch.__version__}; "
        f"matmul peak measured {peak:.1f} TFLOP/s ({'bf16 8192^3' if on_gpu else 'fp32 1024^3'})"
    )
    report("| what | seq | micro-batch | tokens/s | TFLOP/s | MFU | peak GiB | vs best HF |")
    report("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, seq, mb, tokens, tflops, mfu, mem in rows:
        if tokens is None:
            report(f"| {name} | {seq} | {mb} | {mem} | | | | |")
            continue
        hf_best = max(
            (r[3] for r in rows if r[1] == seq and r[0].startswith("HF") and r[3]), default=None
        )
        ratio = f"{tokens / hf_best:.2f}x" if hf_best else "-"
        report(
            f"| {name} | {seq} | {mb} | {tokens:,.0f} | {tflops:.2f} | {mfu:.1%} | "
            f"{mem:.1f} | {ratio} |"
        )
    return rows


if __name__ == "__main__":
    main()
