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


def build(cfg):
    """(job, model config) of a pretraining config."""
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.training.jobs import pretrain

    if cfg.job != "pretrain":
        raise DanubeConfigError(f"job: {cfg.job} is a fine-tuning job; run it with danube-finetune")
    return pretrain.build(cfg)


def main(argv=None) -> None:
    from megatron_danube.cli.common import run_training, summary

    sys.exit(run_training("danube-pretrain", summary(__doc__), build, argv))


if __name__ == "__main__":
    main()
