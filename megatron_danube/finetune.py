"""danube-finetune: chat fine-tuning (`job: sft`) and DPO (`job: dpo`) on Megatron-Core
(`danube-train` for those jobs; kept so that scripts and SLURM jobs written for it keep
working).

    torchrun --nproc-per-node 2 -m megatron_danube.finetune --config FILE.yaml [key=value ...]
"""

import sys


def main(argv=None) -> None:
    from megatron_danube.cli.train import main as train

    sys.exit(train(argv, prog="danube-finetune", family="finetune"))


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
