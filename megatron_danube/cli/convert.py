"""danube-convert: convert checkpoints between megatron_danube and Hugging Face.

--to hf     reads any megatron_danube checkpoint (whatever TP/PP/DP or spec wrote it) and
            writes a MistralForCausalLM directory with the run's tokenizer.
--to mcore  reads an HF Mistral/Llama directory (safetensors only) and writes a checkpoint
            the trainer starts from (`checkpoint.load=DIR checkpoint.load_optimizer=false`).
"""

from __future__ import annotations

import logging
import sys

from megatron_danube.cli.common import cpu_only_process, run_command, summary, weights_only_loads

logger = logging.getLogger("danube-convert")


def add_arguments(p) -> None:
    p.add_argument(
        "--to",
        required=True,
        choices=["hf", "hf-peft", "mcore"],
        help="hf: a megatron_danube run or checkpoint to an HF directory; hf-peft: a LoRA "
        "run's adapter alone, as HF PEFT writes it; mcore: an HF directory to a checkpoint "
        "the trainer starts from",
    )
    p.add_argument("--load", required=True, help="megatron run/checkpoint dir, or HF model dir")
    p.add_argument("--save", required=True, help="output directory (new or empty)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="--to hf: default bfloat16; --to mcore: default the HF weights' dtype",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="--to hf: the tokenizer to export (default: the one the run trained with)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="--to hf: chat template (danube, a .jinja file or text); default: the one a "
        "fine-tuning run recorded, none for pretraining runs",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="--to hf: merge a LoRA run's adapters into the weights (W + alpha/r * B A)",
    )
    p.add_argument(
        "--lora-base",
        default=None,
        help="--to hf --merge-lora: the base checkpoint a LoRA run's adapters apply to, where "
        "it has moved (default: the one the run recorded; checked by its manifest hash)",
    )
    p.add_argument(
        "--model-preset",
        default=None,
        help="--to hf: the model preset, for checkpoints that do not record it",
    )


def convert(args) -> int:
    from megatron_danube.convert.hf_export import prepare_output, remove_failed_output

    prepare_output(args.save)  # refuse a non-empty or unwritable --save before any work
    try:
        if args.to in ("hf", "hf-peft"):
            from megatron_danube.convert.hf_export import to_hf

            out = to_hf(
                args.load,
                args.save,
                args.dtype or ("float32" if args.to == "hf-peft" else "bfloat16"),
                args.model_preset,
                tokenizer=args.tokenizer,
                chat_template=args.chat_template,
                merge_lora=args.merge_lora,
                peft=args.to == "hf-peft",
                lora_base=args.lora_base,
            )
        else:
            from megatron_danube.convert.hf_import import to_mcore

            out = to_mcore(args.load, args.save, args.dtype)
    except BaseException:
        remove_failed_output(args.save)  # never leave a half-written output that looks whole
        raise
    logger.info("wrote %s", out)
    return 0


def command(argv=None) -> int:
    """Run with these arguments; the exit code (2 for bad input)."""
    weights_only_loads()
    return run_command("danube-convert", summary(__doc__), add_arguments, convert, argv)


def main(argv=None) -> None:
    cpu_only_process()  # a CPU tool, on a GPU node too; first, before anything touches CUDA
    sys.exit(command(argv))


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
