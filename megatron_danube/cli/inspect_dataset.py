"""Describe a Megatron indexed dataset: counts, a length histogram, the first documents decoded.

python tools/inspect_dataset.py PREFIX [--tokenizer-model mistral-v1] [--show 3]
"""

import argparse

from megatron_danube.cli.common import fail, report, summary


def main(argv=None) -> int:
    import numpy as np

    from megatron_danube.data.indexed import dataset_exists
    from megatron_danube.errors import DanubeConfigError

    p = argparse.ArgumentParser(prog="danube-inspect-dataset", description=summary(__doc__))
    p.add_argument("prefix")
    p.add_argument("--tokenizer-model", default=None, help="decode with this tokenizer")
    p.add_argument("--show", type=int, default=3, help="documents to print")
    p.add_argument("--bins", type=int, default=10)
    args = p.parse_args(argv)
    try:
        if not dataset_exists(args.prefix):
            raise DanubeConfigError(
                f"{args.prefix}.bin/.idx not found (give the prefix, no extension)"
            )
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        try:
            ds = IndexedDataset(args.prefix)
        except Exception as exc:
            raise DanubeConfigError(
                f"{args.prefix} is not a readable indexed dataset: {exc}"
            ) from None
        doc_idx = ds.document_indices
        seq_lens = ds.sequence_lengths.astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(seq_lens)])
        doc_lens = cum[doc_idx[1:]] - cum[doc_idx[:-1]]
        report(
            f"{args.prefix}: {len(doc_lens):,} documents, {len(seq_lens):,} sequences, "
            f"{int(seq_lens.sum()):,} tokens, dtype {np.dtype(ds.index.dtype).name}"
        )
        if len(doc_lens):
            report(
                f"document length: min {doc_lens.min()}, median {int(np.median(doc_lens))}, "
                f"mean {doc_lens.mean():.1f}, max {doc_lens.max()}"
            )
            edges = np.unique(
                np.geomspace(max(1, doc_lens.min()), doc_lens.max() + 1, args.bins + 1).astype(int)
            )
            counts, edges = np.histogram(doc_lens, bins=edges)
            width = max(counts.max(), 1)
            for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
                report(f"  {lo:>8}-{hi - 1:<8} {c:>9,} {'#' * int(40 * c / width)}")
        tok = None
        if args.tokenizer_model:
            from megatron_danube.data.tokenizer import load_tokenizer

            tok = load_tokenizer(args.tokenizer_model)
        for d in range(min(args.show, len(doc_lens))):
            ids = np.concatenate([ds[i] for i in range(doc_idx[d], doc_idx[d + 1])])
            text = tok.decode(ids.tolist()) if tok else " ".join(map(str, ids[:64].tolist()))
            report(f"--- document {d} ({len(ids)} tokens)\n{text[:500]}")
    except DanubeConfigError as exc:
        return fail("danube-inspect-dataset", str(exc))
    return 0


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
