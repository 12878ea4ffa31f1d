"""danube-compare: run an HF directory and a megatron checkpoint on the same prompts and
print max abs logit difference, top-1 agreement and KL divergence."""

from __future__ import annotations

import sys

from megatron_danube.cli.common import cpu_only_process, run_command, summary, weights_only_loads


def add_arguments(p) -> None:
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--mcore", required=True, help="megatron_danube run or checkpoint directory")
    p.add_argument("--prompt", action="append", help="prompt text, 16 tokens or more (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the HF directory's)")
    p.add_argument("--model-preset", default=None)


def run(args) -> int:
    from megatron_danube.convert.compare import DEFAULT_PROMPTS, compare, encode_prompts
    from megatron_danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or args.hf)
    ids = encode_prompts(tokenizer, args.prompt or DEFAULT_PROMPTS)
    result = compare(args.hf, args.mcore, ids, args.model_preset)
    for key, value in result.items():  # the command's result, on stdout
        sys.stdout.write(
            f"{key}: {value:.6g}\n" if isinstance(value, float) else f"{key}: {value}\n"
        )
    return 0


def command(argv=None) -> int:
    """Run with these arguments; the exit code (2 for bad input)."""
    weights_only_loads()
    return run_command("danube-compare", summary(__doc__), add_arguments, run, argv)


def main(argv=None) -> None:
    cpu_only_process()  # a CPU tool, on a GPU node too; first, before anything touches CUDA
    sys.exit(command(argv))


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
