"""Benchmark tools/preprocess_data.py against the simplest single-process loop, in one run.

Generates a JSONL corpus of at least --mb megabytes from Python's bundled pydoc topics, then
times (1) the baseline: `json.loads` + `encode` per line + megatron's IndexedDatasetBuilder,
and (2) the tool with --workers N. Prints tokens/s of each and their ratio.

    python tools/benchmark_preprocess.py --mb 50 --workers 2
"""

import argparse
import json
import os
import random
import tempfile
import time

from megatron_danube.cli.common import report, summary


def make_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    from megatron_danube.data.demo_corpus import pydoc_paragraphs

    paras = list(pydoc_paragraphs())
    rng = random.Random(seed)
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            doc = "\n\n".join(rng.sample(paras, rng.randint(1, 6)))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def baseline(src: str, prefix: str, tokenizer) -> int:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    with open(src) as f:
        for line in f:
            ids = tokenizer.encode(json.loads(line)["text"]) + [tokenizer.eod]
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def main(argv=None):
    p = argparse.ArgumentParser(prog="danube-benchmark-preprocess", description=summary(__doc__))
    p.add_argument("--mb", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tokenizer-model", default="mistral-v1")
    args = p.parse_args(argv)

    from megatron_danube.cli.preprocess import main as preprocess
    from megatron_danube.data.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer_model)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "corpus.jsonl")
        docs = make_corpus(src, args.mb)
        size = os.path.getsize(src)
        report(f"corpus: {docs:,} documents, {size / 1e6:.1f} MB, {os.cpu_count()} CPUs")

        t = time.perf_counter()
        base_tokens = baseline(src, os.path.join(tmp, "baseline"), tok)
        base_s = time.perf_counter() - t

        t = time.perf_counter()
        rc = preprocess(
            [
                "--input",
                src,
                "--output-prefix",
                os.path.join(tmp, "tool"),
                "--tokenizer-model",
                args.tokenizer_model,
                "--workers",
                str(args.workers),
                "--append-eod",
                "--no-progress",
            ]
        )
        tool_s = time.perf_counter() - t
        assert rc == 0
        tool_bin = os.path.getsize(os.path.join(tmp, "tool_text_document.bin"))
        assert tool_bin == os.path.getsize(os.path.join(tmp, "baseline.bin")), "outputs differ"

    rows = [
        ("baseline: encode per line + IndexedDatasetBuilder (1 process)", base_s),
        (f"preprocess_data.py --workers {args.workers}", tool_s),
    ]
    report("\n| what | seconds | tokens/s | MB/s | ratio |\n| --- | --- | --- | --- | --- |")
    for name, s in rows:
        report(
            f"| {name} | {s:.1f} | {base_tokens / s:,.0f} | {size / 1e6 / s:.1f} | "
            f"{base_s / s:.2f}x |"
        )


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
