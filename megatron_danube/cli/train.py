"""danube-train: run a training job on Megatron-Core; the config's `job:` names which.

    torchrun --nproc-per-node 2 -m megatron_danube.cli.train --config FILE.yaml [key=value ...]
    srun ... python -m megatron_danube.cli.train --config FILE.yaml

The config is checked once into a plan before any process group exists, then the trainer runs
the job: `pretrain` (token stages over indexed corpora), `sft` (chat fine-tuning) or `dpo`
(preference optimisation), or any job registered with training/jobs/registry.py.
SIGTERM/SIGUSR1, from the moment the process starts, make every rank save at the next step
boundary and exit 0. `danube-pretrain` and `danube-finetune` are this command limited to
their jobs.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Optional

logger = logging.getLogger(__name__)

CONVERT_TIMEOUT_S = 3600  # a 1.8B model converts in well under a minute

# What an alias command refuses, and the fix it names.
WRONG_FAMILY = {
    "pretrain": "job: {job} is a fine-tuning job; run it with danube-finetune",
    "finetune": "job: {job} is not a fine-tuning job; set job: sft or dpo, or run danube-pretrain",
}


def main(argv=None, prog: str = "danube-train", family: Optional[str] = None) -> int:
    """Run the config's job (`family`: only that alias's jobs); the exit code."""
    from megatron_danube.runtime.stop import StopRequest

    stop = StopRequest()  # first, before torch loads, so a signal during start-up is not lost
    from megatron_danube.cli.common import run_command, summary, weights_only_loads

    weights_only_loads()

    def add_arguments(parser) -> None:
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="the run config, e.g. examples/configs/danube-tiny-cpu.yaml (required unless "
            "every setting comes as key=value)",
        )
        parser.add_argument("overrides", nargs="*", help="section.key=value overrides")

    def body(args) -> int:
        from megatron_danube.config import load_config
        from megatron_danube.errors import DanubeConfigError
        from megatron_danube.training import trainer
        from megatron_danube.training.preflight import build_plan

        if args.config is None and not args.overrides:
            raise DanubeConfigError(
                "no --config given; pass --config FILE.yaml (examples/configs has one per "
                "recipe, e.g. examples/configs/danube-tiny-cpu.yaml)"
            )
        cfg = load_config(args.config, args.overrides)
        refuse_other_family(cfg.job, family)
        plan = build_plan(cfg)
        return trainer.run(
            plan, stop, convert_start=convert_hf_start, score_tasks=task_scoring(plan.config)
        )

    description = summary(__doc__) if family is None else summary(ALIAS_DOCS[family])
    return run_command(prog, description, add_arguments, body, argv)


def refuse_other_family(job: str, family: Optional[str]) -> None:
    """An alias command runs only its own family's jobs (None: danube-train, every job)."""
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.training.jobs.registry import get_job

    if family is not None and get_job(job).family != family:
        raise DanubeConfigError(WRONG_FAMILY[family].format(job=job))


ALIAS_DOCS = {
    "pretrain": "danube-pretrain: pretrain a Danube model on Megatron-Core (danube-train for "
    "`job: pretrain` configs).",
    "finetune": "danube-finetune: chat fine-tuning (`job: sft`) and DPO (`job: dpo`) on "
    "Megatron-Core (danube-train for those jobs); starts from `checkpoint.load`, weights only.",
}


def task_scoring(cfg):
    """The trainer's hook that scores `eval.tasks` (None without tasks), checked now: lm-eval
    installed, every task known and its data on this machine."""
    if not cfg.eval.tasks:
        return None
    from megatron_danube.eval.in_loop import TaskScoring

    return TaskScoring.checked(cfg.eval, cfg.run_dir)


def convert_hf_start(start) -> None:
    """The plan's HF start directory as a checkpoint at `start.checkpoint`, converted once by
    a separate process (the converter runs its own one-rank process group)."""
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.runtime.distributed import launcher_free_env

    hf_dir, out = start.convert_from_hf, start.checkpoint
    if os.path.exists(os.path.join(out, "manifest.json")):
        return
    logger.info("converting the HF model %s to %s (once)", hf_dir, out)
    cmd = [sys.executable, "-m", "megatron_danube.cli.convert", "--to", "mcore"]
    try:
        proc = subprocess.run(
            cmd + ["--load", hf_dir, "--save", out],
            env=launcher_free_env(),
            capture_output=True,
            text=True,
            timeout=CONVERT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise DanubeConfigError(
            f"converting {hf_dir} took over {CONVERT_TIMEOUT_S} s; convert it first with "
            f"danube-convert --to mcore and set checkpoint.load to the result"
        ) from None
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        reason = (errors or proc.stderr.strip().splitlines() or ["no output"])[-1].strip()
        raise DanubeConfigError(f"converting {hf_dir} failed (exit {proc.returncode}): {reason}")


def main_exit() -> None:
    """The `danube-train` console script."""
    sys.exit(main())


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
