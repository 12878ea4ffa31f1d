"""danube-pretrain: pretrain a Danube model on Megatron-Core (`danube-train` for
`job: pretrain` configs; kept so that scripts and SLURM jobs written for it keep working).

    torchrun --nproc-per-node 2 -m megatron_danube.pretrain --config FILE.yaml [key=value ...]
"""

import sys


def main(argv=None) -> None:
    from megatron_danube.cli.train import main as train

    sys.exit(train(argv, prog="danube-pretrain", family="pretrain"))


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
