"""danube-pretrain: pretrain a Danube model on Megatron-Core.

    torchrun --nproc-per-node 2 -m megatron_danube.pretrain --config FILE.yaml [key=value ...]
    srun ... python -m megatron_danube.pretrain --config FILE.yaml

The loop, top to bottom: read and check the config; start the runtime; build model, DDP,
optimizer and LR schedule; resume from the latest checkpoint; then per step pick the stage
(sequence length and blend by consumed tokens), run megatron's schedule, step, log, evaluate,
save. SIGTERM/SIGUSR1 make every rank save at the next step boundary and exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass

for _category in (UserWarning, FutureWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category)
# Every torch.load megatron does on our checkpoints is weights-only: no pickled code runs.
os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_danube.errors import DanubeConfigError  # noqa: E402
from megatron_danube.training.config import RunConfig, load_config, save_config  # noqa: E402


@dataclass
class TrainState:
    iteration: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    bad_steps_in_row: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class StopRequest:
    """Set by SIGTERM/SIGUSR1; acted on by all ranks together at a step boundary."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self, device) -> bool:
        flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def log0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def check_config(cfg: RunConfig):
    """Everything that can be checked before a process group or any data exists."""
    from megatron_danube.data.datasets import check_prefixes, parse_blend
    from megatron_danube.data.tokenizer import load_tokenizer
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import check_layout
    from megatron_danube.training.stages import plan_stages

    model = get_preset(cfg.model.preset).replace(**cfg.model.overrides)
    max_seq = max(stage.seq_length for stage in cfg.stages)
    launch, device_type, spec = check_layout(
        model, cfg.parallel, spec=cfg.model.spec, device=cfg.train.device, seq_length=max_seq
    )
    stages = plan_stages(cfg, cfg.parallel.data_parallel(launch.world_size), max_seq)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    if tokenizer.vocab_size > model.vocab_size:
        raise DanubeConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model {model.name} has vocab "
            f"{model.vocab_size}; use a matching tokenizer or model.overrides.vocab_size"
        )
    for stage in stages:
        prefixes, _ = parse_blend(list(stage.blend), f"blend of stage {stage.index}")
        missing_ok = {cfg.data.demo_corpus_prefix} if cfg.data.demo_corpus_prefix else set()
        check_prefixes([p for p in prefixes if p not in missing_ok])
    if not 0 <= cfg.optim.warmup_tokens < cfg.train.train_tokens:
        raise DanubeConfigError(
            f"optim.warmup_tokens {cfg.optim.warmup_tokens} must be >= 0 and below "
            f"train.train_tokens {cfg.train.train_tokens}"
        )
    if cfg.precision.params_dtype == "float16" and device_type != "cuda":
        raise DanubeConfigError("precision.params_dtype=float16 needs a GPU; use float32 on CPU")
    if cfg.checkpoint.load and not os.path.isdir(cfg.checkpoint.load):
        raise DanubeConfigError(f"checkpoint.load={cfg.checkpoint.load} is not a directory")
    return model, stages, tokenizer


def build_optimizer(cfg: RunConfig, chunks, config):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = cfg.optim
    dtype = config.params_dtype
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",  # decoupled weight decay: AdamW
            lr=opt.lr,
            min_lr=opt.lr * opt.min_lr_ratio,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.beta1,
            adam_beta2=opt.beta2,
            adam_eps=opt.eps,
            clip_grad=opt.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            initial_loss_scale=opt.initial_loss_scale,
            use_distributed_optimizer=opt.distributed_optimizer,
        ),
        chunks,
    )
    if dtype == torch.float16:
        config.grad_scale_func = optimizer.scale_loss
    # The schedule's unit is tokens, so it is unchanged when the sequence length changes.
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.lr * opt.min_lr_ratio,
        lr_warmup_steps=opt.warmup_tokens,
        lr_decay_steps=cfg.train.train_tokens,
        lr_decay_style="cosine",
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=cfg.train.train_tokens,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def run(cfg: RunConfig) -> int:
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import (
        init_num_microbatches_calculator,
        reconfigure_num_microbatches_calculator,
    )

    from megatron_danube.data.datasets import build_datasets, step_iterators
    from megatron_danube.data.demo_corpus import ensure_demo_corpus
    from megatron_danube.models.builder import build_model_chunks, count_parameters
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.runtime.distributed import initialize, shutdown
    from megatron_danube.training.checkpointing import CheckpointManager
    from megatron_danube.training.metrics import (
        H100_BF16_DENSE_TFLOPS,
        MetricsWriter,
        Throughput,
        flops_per_token,
    )
    from megatron_danube.training.stages import stage_at
    from megatron_danube.training.step import forward_backward, train_step, wrap_with_ddp

    # 1. Check everything cheap first, then start the runtime.
    model_cfg, stages, tokenizer = check_config(cfg)
    rt = initialize(
        model_cfg,
        cfg.parallel,
        seed=cfg.train.seed,
        spec=cfg.model.spec,
        device=cfg.train.device,
        seq_length=max(s.seq_length for s in stages),
    )
    run_dir = cfg.run_dir
    if rt.is_main:
        os.makedirs(run_dir, exist_ok=True)
        save_config(cfg, os.path.join(run_dir, "config.yaml"))
        if cfg.data.demo_corpus_prefix:
            ensure_demo_corpus(cfg.data.demo_corpus_prefix, tokenizer)
    dist.barrier()

    # 2. Model, DDP, optimizer, LR schedule.
    config = build_transformer_config(
        model_cfg,
        cfg.parallel,
        spec=rt.spec,
        device_type=rt.device.type,
        precision=cfg.precision,
        recompute=cfg.recompute,
    )
    chunks = build_model_chunks(model_cfg, config, rt.spec, rt.device)
    chunks = wrap_with_ddp(
        chunks,
        config,
        use_distributed_optimizer=cfg.optim.distributed_optimizer,
        overlap_grad_reduce=cfg.optim.overlap_grad_reduce,
    )
    optimizer, scheduler = build_optimizer(cfg, chunks, config)
    log0(
        f"model {model_cfg.name}: {model_cfg.num_parameters():,} parameters "
        f"({count_parameters(chunks):,} on rank 0), spec={rt.spec}, device={rt.device.type}, "
        f"TP={cfg.parallel.tensor_parallel} PP={cfg.parallel.pipeline_parallel} "
        f"VPP={cfg.parallel.virtual_pipeline} DP={rt.data_parallel}"
    )

    # 3. Resume.
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
    state = TrainState()
    resume_from = checkpoints.latest() or cfg.checkpoint.load
    if resume_from:
        own = resume_from != cfg.checkpoint.load
        saved = checkpoints.load(
            resume_from, chunks, optimizer, load_optimizer=own or cfg.checkpoint.load_optimizer
        )
        if own:  # continuing this run; a foreign checkpoint only provides the weights
            state = TrainState(**{k: saved[k] for k in TrainState().to_dict()})
        log0(f"resumed from {resume_from} at iteration {state.iteration}, "
             f"{state.consumed_tokens:,} tokens")
    if state.consumed_tokens:
        scheduler.step(increment=state.consumed_tokens)

    # 4. Train.
    stop = StopRequest()
    writer = MetricsWriter(run_dir, rt.is_main, cfg.logging.tensorboard)
    peak = cfg.logging.peak_tflops or (H100_BF16_DENSE_TFLOPS if rt.device.type == "cuda" else None)
    gbt, mbs, dp = cfg.train.global_batch_tokens, cfg.train.micro_batch_size, rt.data_parallel
    dp_rank = parallel_state.get_data_parallel_rank()
    current, train_ds, valid_ds = None, None, None
    window = {"loss": 0.0, "n": 0, "grad_norm": 0.0}
    throughput = Throughput()
    steps_this_run, exit_code, reason = 0, 0, "finished"
    init_num_microbatches_calculator(
        rt.rank, None, stages[0].global_batch_seqs, mbs, dp, decrease_batch_size_if_needed=False
    )

    last_saved = [None]

    def save():
        if last_saved[0] == state.iteration:
            return
        last_saved[0] = state.iteration
        checkpoints.save(
            state.iteration,
            chunks,
            optimizer,
            dict(
                state.to_dict(),
                stage=current.index if current else 0,
                model=dataclasses.asdict(model_cfg),
                tokenizer=cfg.data.tokenizer,
                tokenizer_type=cfg.data.tokenizer_type,
            ),
        )

    def evaluate():
        if valid_ds is None or len(valid_ds) < current.global_batch_seqs:
            return None
        totals = torch.zeros(2, dtype=torch.float64)
        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            n = min(cfg.logging.eval_iters, len(valid_ds) // current.global_batch_seqs)
            for i in range(n):
                iters = step_iterators(
                    valid_ds,
                    first_sample=i * current.global_batch_seqs,
                    global_batch=current.global_batch_seqs,
                    dp_rank=dp_rank,
                    dp_size=dp,
                    micro_batch_size=mbs,
                    num_chunks=len(chunks),
                )
                totals += forward_backward(
                    chunks, iters, num_microbatches=current.num_microbatches,
                    seq_length=current.seq_length, micro_batch_size=mbs, forward_only=True,
                ).cpu()
        for chunk in chunks:
            chunk.train()
        loss = (totals[0] / totals[1]).item()
        return {"iteration": state.iteration, "consumed_tokens": state.consumed_tokens,
                "val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    t_start = time.perf_counter()
    tokens_at_start = state.consumed_tokens
    while state.consumed_tokens < cfg.train.train_tokens:
        stage = stage_at(stages, state.consumed_tokens)
        if stage != current:
            current = stage
            train_ds, valid_ds = build_datasets(
                list(stage.blend),
                seq_length=stage.seq_length,
                split=cfg.data.split,
                train_samples=stage.num_samples,
                valid_samples=cfg.logging.eval_iters * stage.global_batch_seqs,
                tokenizer=tokenizer,
                seed=cfg.data.seed,
                cache_dir=os.path.join(run_dir, "data_cache"),
            )
            reconfigure_num_microbatches_calculator(
                rt.rank, None, stage.global_batch_seqs, mbs, dp, decrease_batch_size_if_needed=False
            )
            log0(f"stage {stage.index}: seq_length {stage.seq_length}, "
                 f"{stage.global_batch_seqs} sequences/step, {stage.num_microbatches} "
                 f"micro-batches/rank, from {stage.start_tokens:,} tokens")

        iters = step_iterators(
            train_ds,
            first_sample=stage.sample_index(state.consumed_tokens),
            global_batch=stage.global_batch_seqs,
            dp_rank=dp_rank,
            dp_size=dp,
            micro_batch_size=mbs,
            num_chunks=len(chunks),
        )
        result = train_step(
            chunks, optimizer, iters, num_microbatches=stage.num_microbatches,
            seq_length=stage.seq_length, micro_batch_size=mbs,
        )
        state.iteration += 1
        state.consumed_tokens += gbt
        steps_this_run += 1
        scheduler.step(increment=gbt)
        throughput.add(gbt, gbt * flops_per_token(model_cfg, stage.seq_length))
        if result["skipped"] or not math.isfinite(result["loss"]):
            state.skipped_steps += 1
            state.bad_steps_in_row += 1 if not math.isfinite(result["loss"]) else 0
        else:
            state.bad_steps_in_row = 0
            window["loss"] += result["loss"]
            window["grad_norm"] += result["grad_norm"]
            window["n"] += 1
        checkpoints.maybe_finalize()

        if state.iteration % cfg.logging.log_interval == 0:
            rates = throughput.rates(rt.world_size, peak)
            done = state.consumed_tokens - tokens_at_start
            elapsed = time.perf_counter() - t_start
            record = {
                "iteration": state.iteration,
                "consumed_tokens": state.consumed_tokens,
                "stage": stage.index,
                "seq_length": stage.seq_length,
                "loss": window["loss"] / max(window["n"], 1),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": window["grad_norm"] / max(window["n"], 1),
                "skipped_steps": state.skipped_steps,
                "memory_gib": memory_gib(),
                "eta_s": elapsed / max(done, 1) * (cfg.train.train_tokens - state.consumed_tokens),
                **rates,
            }
            writer.write(record, state.iteration)
            log0(
                f"iter {state.iteration:6d} | tokens {state.consumed_tokens:,} | loss "
                f"{record['loss']:.4f} | lr {record['lr']:.3e} | grad {record['grad_norm']:.3f} | "
                f"{rates['tokens_per_s']:,.0f} tok/s | {rates['tflops_per_gpu']:.2f} TFLOP/s/GPU"
                + (f" | MFU {rates['mfu']:.1%}" if "mfu" in rates else "")
                + f" | mem {record['memory_gib']:.1f} GiB | ETA {record['eta_s'] / 60:.1f} min"
            )
            window = {"loss": 0.0, "n": 0, "grad_norm": 0.0}
            throughput.reset()

        if cfg.logging.eval_interval and state.iteration % cfg.logging.eval_interval == 0:
            val = evaluate()
            if val:
                writer.write(val, state.iteration, prefix="valid")
                log0(f"validation at iter {state.iteration}: loss {val['val_loss']:.4f}, "
                     f"ppl {val['val_ppl']:.2f}")

        if state.bad_steps_in_row >= cfg.train.max_bad_steps:
            reason, exit_code = f"{state.bad_steps_in_row} non-finite losses in a row", 1
            save()
            break
        if cfg.checkpoint.save_interval and state.iteration % cfg.checkpoint.save_interval == 0:
            save()
        if stop.agreed(rt.device):
            reason = "signal received: saved at a step boundary"
            save()
            break
        if cfg.train.exit_after_steps and steps_this_run >= cfg.train.exit_after_steps:
            reason = f"exit_after_steps={cfg.train.exit_after_steps}"
            save()
            break
    else:
        val = evaluate()
        if val:
            writer.write(val, state.iteration, prefix="valid")
            log0(f"final validation: loss {val['val_loss']:.4f}, ppl {val['val_ppl']:.2f}")
        save()

    checkpoints.close()
    writer.close()
    log0(f"stopped at iteration {state.iteration} ({state.consumed_tokens:,} tokens): {reason}")
    shutdown()
    return exit_code


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="danube-pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (see examples/configs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        code = run(cfg)
    except DanubeConfigError as exc:
        print(f"danube-pretrain: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code)


if __name__ == "__main__":
    main()
