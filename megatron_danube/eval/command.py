"""danube-eval: score a megatron_danube checkpoint on lm-eval tasks at any TP/PP/DP layout.

    torchrun --nproc-per-node N -m megatron_danube.eval --load RUN_OR_CHECKPOINT \
        --tasks danube_demo_mc,danube_demo_ppl --output results.json [key=value ...]

The layout comes as overrides (`parallel.tensor_parallel=2`, `parallel.pipeline_parallel=2`;
data parallel is what the world size leaves). Tasks, their data (offline), the checkpoint,
its tokenizer and the layout are checked before any model work. Rank 0 prints lm-eval's table
and writes lm-eval's `results` to --output.
"""

from __future__ import annotations

import logging
import sys

from megatron_danube.commands import launched_rank, report, run_command, summary, weights_only_loads

logger = logging.getLogger("danube-eval")


def add_arguments(p) -> None:
    p.add_argument("--load", help="megatron_danube run directory or checkpoint to evaluate")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer (default: the one the run trained with)"
    )
    p.add_argument("--tasks", default="", help="lm-eval task names, comma-separated")
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of task YAMLs (repeatable)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument(
        "--limit", type=float, default=None, help="documents per task (below 1: a fraction)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per replica")
    p.add_argument("--max-length", type=int, default=None, help="default: the model's positions")
    p.add_argument(
        "--bootstrap-iters", type=int, default=100000, help="for standard errors; 0: none"
    )
    p.add_argument("--output", default=None, help="results JSON (lm-eval's `results` and more)")
    p.add_argument(
        "--log-samples",
        action="store_true",
        help="also write each document's responses (log-likelihoods, generations) to --output",
    )
    p.add_argument(
        "--demo-tasks",
        default=None,
        metavar="DIR",
        help="write the pydoc demo tasks (danube_demo_mc, danube_demo_ppl) into DIR and "
        "include it; alone (no --load), only write them",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value (layout, device, precision)")


def evaluate_command(args) -> int:
    from megatron_danube.eval.load_path import check_load_path

    if args.load or not args.demo_tasks:
        check_load_path(args.load)  # before the imports of megatron-core (seconds)
    from megatron_danube.config import load_config
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.eval import tasks as task_checks
    from megatron_danube.eval.demo_tasks import write_demo_tasks
    from megatron_danube.eval.loading import check_checkpoint

    task_checks.go_offline()  # before lm-eval imports `datasets`, which reads it once
    if args.demo_tasks and not args.load and not args.tasks:
        logger.info("wrote the demo tasks to %s", write_demo_tasks(args.demo_tasks))
        return 0
    cfg = load_config(None, args.overrides)
    names = task_checks.split_names(args.tasks)
    if not names:
        raise DanubeConfigError("no task given; pass --tasks NAME[,NAME...]")
    if args.limit is not None and args.limit <= 0:
        raise DanubeConfigError(f"--limit {args.limit:g}; give a positive count or fraction")
    if args.batch_size < 1:
        raise DanubeConfigError(f"--batch-size {args.batch_size}; it must be >= 1")
    # The checkpoint first: its check takes a moment, lm-eval's task index about 15 s.
    checked = check_checkpoint(args.load, cfg, args.tokenizer)
    include = task_checks.with_demo_tasks(names, args.include_path, args.demo_tasks)
    manager = task_checks.task_manager(include)
    task_checks.load_tasks(names, manager)
    return _run(args, cfg, names, manager, checked)


def _run(args, cfg, names, manager, checked) -> int:
    from megatron_danube.eval.lm import DanubeLM
    from megatron_danube.eval.loading import load_checkpoint
    from megatron_danube.eval.results import evaluate, table, write_json
    from megatron_danube.runtime.distributed import shutdown

    loaded = load_checkpoint(checked, cfg)
    try:
        lm = DanubeLM.around(loaded, batch_size=args.batch_size, max_length=args.max_length)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate(
            lm,
            names,
            manager,
            num_fewshot=args.num_fewshot,
            limit=limit,
            bootstrap_iters=args.bootstrap_iters,
            log_samples=args.log_samples,
        )
        if launched_rank() == 0 and results is not None:
            report(table(results))  # what the user asked for, on stdout
            if args.output:
                about = {
                    "checkpoint": loaded.checkpoint,
                    "iteration": loaded.iteration,
                    "tensor_parallel": cfg.parallel.tensor_parallel,
                    "pipeline_parallel": cfg.parallel.pipeline_parallel,
                    "data_parallel": loaded.runtime.data_parallel,
                }
                write_json(results, args.output, about)
                logger.info("wrote %s", args.output)
    finally:
        shutdown()
    return 0


def command(argv=None) -> int:
    """Run with these arguments; the exit code (2 for bad input)."""
    weights_only_loads()
    return run_command("danube-eval", summary(__doc__), add_arguments, evaluate_command, argv)


def main(argv=None) -> None:
    sys.exit(command(argv))
