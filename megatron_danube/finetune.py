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


def build(cfg):
    """(job, model config) of an SFT or DPO config."""
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.training.jobs import dpo, sft

    if cfg.job not in FINETUNE_JOBS:
        raise DanubeConfigError(
            f"job: {cfg.job} is not a fine-tuning job; set job: sft or dpo, or run danube-pretrain"
        )
    return (dpo if cfg.job == "dpo" else sft).build(cfg)


def main(argv=None) -> None:
    from megatron_danube.cli.common import run_training, summary

    sys.exit(run_training("danube-finetune", summary(__doc__), build, argv))


if __name__ == "__main__":
    main()
