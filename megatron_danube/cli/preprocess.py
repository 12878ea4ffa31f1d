"""Tokenise a corpus into Megatron indexed datasets (PREFIX_KEY_document.bin/.idx)

danube-preprocess takes Megatron-LM's tools/preprocess_data.py flags and writes its format;
the work is `megatron_danube.data.preprocess`, given the flags as `PreprocessOptions`. Like
Megatron-LM's tool it writes its summary, progress and warnings to stderr.
"""

from __future__ import annotations

import logging
import sys

from megatron_danube.cli.common import run_command, summary
from megatron_danube.data.preprocess import (
    BATCH_LINES,
    NoDocumentsWritten,
    PreprocessOptions,
    Result,
    default_workers,
    preprocess,
)
from megatron_danube.data.preprocess import logger as library_logger

PROG = "danube-preprocess"

logger = logging.getLogger(__name__)


def add_arguments(p) -> None:
    _add_input_arguments(p.add_argument_group("input"))
    _add_tokenizer_and_output_arguments(p)
    _add_runtime_arguments(p.add_argument_group("runtime"))


def _add_input_arguments(g) -> None:
    g.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="JSONL (.jsonl, .gz, .zst), parquet or text files, directories or globs",
    )
    g.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to extract (default: text), one output each. A value is a string, or a list "
        "of strings taken "
        "as the document's sentences (Megatron-LM's pre-split format; with "
        "--split-sentences each item is one sentence, without it the items' tokens are "
        "concatenated into one document). With several keys the outputs stay aligned, "
        "one document per record in each: a key that is empty or missing gets an empty "
        "document (one empty item; just the EOD with --append-eod), reported as a warning; "
        "a record with no text under any key is skipped. (Megatron-LM writes an empty key "
        "as a document of no items, without EOD, and stops at a missing key.) With one "
        "key, unlike Megatron-LM, empty records are skipped and reported: there is nothing "
        "to keep aligned, an empty document has no text to train on, and as an item "
        "GPTDataset would count and shuffle it like any document (a lone EOD with "
        "--append-eod)",
    )
    g.add_argument(
        "--split-sentences", action="store_true", help="store sentences as items (nltk punkt)"
    )
    g.add_argument(
        "--keep-newlines",
        action="store_true",
        help="with --split-sentences, keep the newlines (all whitespace) between "
        "sentences, each with the sentence before it, as Megatron-LM does; "
        "without --split-sentences documents are tokenised whole, newlines "
        "included, either way",
    )
    g.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    g.add_argument(
        "--max-documents",
        type=int,
        default=None,
        metavar="N",
        help="read only the first N input records (JSONL/text lines, parquet rows) "
        "of the whole input, in order, then stop; bad records, blank lines "
        "included, count as read and are skipped, so fewer than N documents may "
        "be written. Default: all. Not with --partition-index",
    )


def _add_tokenizer_and_output_arguments(p) -> None:
    g = p.add_argument_group("tokenizer")
    g.add_argument(
        "--tokenizer-model",
        required=True,
        help="SentencePiece .model, HF tokenizer directory, or mistral-v1",
    )
    g.add_argument(
        "--tokenizer-type",
        default=None,
        help="SentencePieceTokenizer or HuggingFaceTokenizer (default: inferred)",
    )
    g.add_argument(
        "--append-eod", action="store_true", help="append the EOS token to each document"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _add_runtime_arguments(g) -> None:
    g.add_argument("--workers", type=int, default=default_workers(), help="tokeniser processes")
    g.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="split the input into K parts (files or line ranges) processed one by one",
    )
    g.add_argument(
        "--partition-index",
        type=int,
        default=None,
        help="process only this partition (SLURM arrays: $SLURM_ARRAY_TASK_ID); no merge",
    )
    g.add_argument(
        "--keep-partitions", action="store_true", help="keep per-partition outputs after merging"
    )
    g.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="accepted for Megatron-LM compatibility: output is always in input order, "
        "since partitions are consecutive runs of the input merged in order "
        "(Megatron-LM deals lines round-robin to partitions without this flag)",
    )
    g.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first record that would be skipped (an empty key kept as an "
        "empty document beside other keys is a warning, not an error)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--log-interval",
        type=int,
        default=None,
        metavar="N",
        help="log documents written, tokens, elapsed time, docs/s and MB/s to stderr "
        f"each time the document count passes a multiple of N (checked per "
        f"batch of {BATCH_LINES} records). Default: off; the progress bar shows "
        f"the same on a terminal (Megatron-LM's default is 1000)",
    )


def to_options(args) -> PreprocessOptions:
    """The library's options from the parsed flags (one field per flag)."""
    values = dict(vars(args))
    # Accepted for Megatron-LM's command lines only: partitions always keep the input order.
    values.pop("keep_sequential_samples")
    values["progress"] = not values.pop("no_progress")
    return PreprocessOptions(**values)


def run(args) -> int:
    options = to_options(args)
    try:
        result = preprocess(options)
    except NoDocumentsWritten as exc:
        summarize(options, exc.result)  # what was read and skipped, above the error about it
        raise
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted; no output was written")
        return 130
    summarize(options, result)
    return 0


def stderr_logging() -> None:
    """Progress and warnings go to stderr as `preprocess: ...`, where Megatron-LM prints them,
    unless the caller has set up logging; only this command's INFO lines, not megatron-core's,
    are let through."""
    logging.basicConfig(stream=sys.stderr, format="preprocess: %(message)s")
    for log in (logger, library_logger):
        log.setLevel(logging.INFO)


def say(line: str) -> None:
    """The tool's summary: its result, on stderr as Megatron-LM's tool writes it."""
    sys.stderr.write(line + "\n")


def summarize(options: PreprocessOptions, result: Result) -> None:
    totals, dt = result.stats, result.seconds
    if options.max_documents is not None and totals.records == options.max_documents:
        logger.info(
            "stopped after the first %s input records (--max-documents)", f"{totals.records:,}"
        )
    say(
        f"preprocess: {totals.documents:,} documents, {totals.tokens:,} tokens, "
        f"{totals.bytes / 1e6:.1f} MB in {dt:.1f} s "
        f"({totals.tokens / max(dt, 1e-9):,.0f} tokens/s, {options.workers} workers)"
    )
    if totals.bad:
        counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(totals.bad.items()))
        say(f"preprocess: skipped {sum(totals.bad.values())} bad records ({counts}); first:")
        for line in totals.reported:
            say(f"  {line}")
    if totals.kept_empty:
        counts = ", ".join(
            f"{n} {k.replace('_', ' ')}" for k, n in sorted(totals.kept_empty.items())
        )
        logger.warning(
            "kept %d records whose key was empty or missing as an empty document in "
            "that key's output, so that all outputs stay aligned (%s); first:\n%s",
            sum(totals.kept_empty.values()),
            counts,
            "\n".join(f"  {line}" for line in totals.kept_reported),
        )
    if options.partition_index is None and totals.documents:
        for prefix in result.prefixes:
            say(f"wrote {prefix}.bin/.idx")


def main(argv=None) -> int:
    """Run with these arguments; the exit code (2 for bad input, 130 when interrupted)."""
    return run_command(
        PROG, summary(__doc__), add_arguments, run, argv, logging_setup=stderr_logging
    )


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
