"""danube-finetune: chat fine-tuning (`job: sft`) and DPO (`job: dpo`) on Megatron-Core.

    torchrun --nproc-per-node 2 -m megatron_danube.finetune --config FILE.yaml [key=value ...]
    srun ... python -m megatron_danube.finetune --config FILE.yaml

Starts from `checkpoint.load` (a run directory, a checkpoint, or an HF model directory, which
is converted once), weights only. Signals behave as in danube-pretrain: SIGTERM/SIGUSR1 make
every rank save at the next step boundary and exit 0.
"""

from __future__ import annotations

import os
import sys

# Every torch.load megatron does on our checkpoints is weights-only: no pickled code runs.
os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")

FINETUNE_JOBS = ("sft", "dpo")


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML run config (see examples/configs/*-sft.yaml)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def main(argv=None) -> None:
    from megatron_danube.cli.common import run_command
    from megatron_danube.training.trainer import StopRequest

    stop = StopRequest()  # first, so a signal during start-up is not lost

    def body(args) -> int:
        from megatron_danube.config import load_config
        from megatron_danube.errors import DanubeConfigError
        from megatron_danube.training import trainer
        from megatron_danube.training.jobs import dpo, sft

        cfg = load_config(args.config, args.overrides)
        if cfg.job not in FINETUNE_JOBS:
            raise DanubeConfigError(
                f"job: {cfg.job} is not a fine-tuning job; set job: sft or dpo, or run "
                f"danube-pretrain"
            )
        job, model_cfg = (dpo if cfg.job == "dpo" else sft).build(cfg)
        return trainer.run(cfg, job, model_cfg, stop)

    sys.exit(run_command("danube-finetune", __doc__.splitlines()[0], add_arguments, body, argv))


if __name__ == "__main__":
    main()
