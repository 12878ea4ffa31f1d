"""Join Megatron indexed datasets (e.g. preprocessing partitions) into one, in the order given.

danube-merge-datasets --input A_text_document B_text_document \
        --output-prefix C_text_document
"""

import argparse

from megatron_danube.cli.common import fail, report, summary


def main(argv=None) -> int:
    from megatron_danube.data.indexed import IndexedWriter, dataset_exists
    from megatron_danube.errors import DanubeConfigError

    p = argparse.ArgumentParser(prog="danube-merge-datasets", description=summary(__doc__))
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (no .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        import numpy as np
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dtypes = set()
        for prefix in args.input:
            if not dataset_exists(prefix):
                raise DanubeConfigError(f"{prefix}.bin/.idx not found; pass dataset prefixes")
            dtypes.add(IndexedDataset(prefix).index.dtype)
        if len(dtypes) > 1:
            raise DanubeConfigError(
                f"inputs have different token dtypes "
                f"{sorted(np.dtype(d).name for d in dtypes)}; "
                f"they were made with different tokenizers"
            )
        with IndexedWriter(
            args.output_prefix, dtype=dtypes.pop(), overwrite=args.overwrite
        ) as writer:
            for prefix in args.input:
                writer.add_prefix(prefix)
        report(
            f"wrote {args.output_prefix}.bin/.idx: {writer.documents:,} documents, "
            f"{writer.tokens:,} tokens"
        )
    except DanubeConfigError as exc:
        return fail("danube-merge-datasets", str(exc))
    return 0


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
