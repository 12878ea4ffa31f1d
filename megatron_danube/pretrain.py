"""danube-pretrain: pretrain a Danube model on Megatron-Core.

    torchrun --nproc-per-node 2 -m megatron_danube.pretrain --config FILE.yaml [key=value ...]
    srun ... python -m megatron_danube.pretrain --config FILE.yaml

Reads and checks the config, then runs the trainer with the pretraining job (stage schedule
over GPTDataset blends). SIGTERM/SIGUSR1, from the moment the process starts, make every rank
save at the next step boundary and exit 0.
"""

from __future__ import annotations

import os
import sys

# Every torch.load megatron does on our checkpoints is weights-only: no pickled code runs.
os.environ.setdefault("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML run config (see examples/configs)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def main(argv=None) -> None:
    from megatron_danube.cli.common import run_command
    from megatron_danube.training.trainer import StopRequest

    stop = StopRequest()  # first, so a signal during start-up is not lost

    def body(args) -> int:
        from megatron_danube.config import load_config
        from megatron_danube.training import trainer
        from megatron_danube.training.jobs import pretrain

        cfg = load_config(args.config, args.overrides)
        if cfg.job != "pretrain":
            from megatron_danube.errors import DanubeConfigError

            raise DanubeConfigError(
                f"job: {cfg.job} is a fine-tuning job; run it with danube-finetune"
            )
        job, model_cfg = pretrain.build(cfg)
        return trainer.run(cfg, job, model_cfg, stop)

    sys.exit(run_command("danube-pretrain", __doc__.splitlines()[0], add_arguments, body, argv))


if __name__ == "__main__":
    main()
