"""Corpora into Megatron indexed datasets: Megatron-LM's flags and format, streamed, safe.

The parent process reads raw lines and hands batches to a pool of workers, keeping a bounded
number of batches in flight (memory does not grow with the corpus) and writing results in
input order (output is identical for any number of workers). Workers decode, parse, check,
split sentences and tokenise. Bad records are counted, reported with file:line and skipped,
or are fatal with --strict. With several --json-keys the outputs stay aligned record for
record: a key that is empty or missing beside other keys with text gets an empty document,
reported as a warning. Output is renamed into place only on success.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from megatron_danube.data.indexed import IndexedWriter, dataset_exists, token_dtype
from megatron_danube.data.sources import Piece, expand_inputs, make_partitions, read_piece
from megatron_danube.data.tokenizer import load_tokenizer
from megatron_danube.errors import DanubeConfigError, missing_extra_message

BATCH_LINES = 512
MAX_REPORTED = 5

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- worker side

_W: Dict[str, object] = {}


def _init_worker(
    tokenizer_spec, tokenizer_type, keys, split_sentences, lang, append_eod, keep_newlines
):
    _W["tok"] = load_tokenizer(tokenizer_spec, tokenizer_type)
    _W["keys"] = keys
    _W["append_eod"] = append_eod
    _W["splitter"] = (
        sentence_splitter(lang, keep_newlines=keep_newlines) if split_sentences else None
    )


_SPLITTER_WARNED = False


def sentence_splitter(
    lang: str, quiet: bool = True, keep_newlines: bool = False
) -> Callable[[str], List[str]]:
    """nltk punkt for `lang`; without punkt data (no downloads here), nltk's untrained Punkt.

    punkt drops the whitespace between sentences. With `keep_newlines` each sentence runs up to
    the start of the next one instead, so the newlines after it are tokenised with it (what
    Megatron-LM's --keep-newlines gives); the text after the last sentence is dropped, as punkt
    does.
    """
    global _SPLITTER_WARNED
    import nltk.tokenize.punkt as punkt

    try:
        tokenizer = punkt.PunktTokenizer(lang)
    except (LookupError, OSError, ValueError):
        if not quiet and not _SPLITTER_WARNED:
            logger.warning(
                "nltk punkt data for %r is not installed; using nltk's untrained Punkt "
                "sentence splitter (python -m nltk.downloader punkt_tab installs the trained one)",
                lang,
            )
            _SPLITTER_WARNED = True
        tokenizer = punkt.PunktSentenceTokenizer()
    if not keep_newlines:
        return tokenizer.tokenize

    def split_keeping_newlines(text: str) -> List[str]:
        spans = list(tokenizer.span_tokenize(text))
        if not spans:
            return []
        cuts = [0] + [start for start, _ in spans[1:]] + [spans[-1][1]]
        return [text[a:b] for a, b in itertools.pairwise(cuts)]

    return split_keeping_newlines


def _record(kind: str, raw) -> Tuple[object, Optional[str]]:
    """(record, None), or (None, reason) when the line cannot be read at all."""
    if kind == "parquet":
        return raw, None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    if kind == "text":
        return line.rstrip("\r\n"), None
    if not line.strip():
        return None, "empty"
    try:
        return json.loads(line), None
    except ValueError:
        return None, "malformed_json"


def _value(record, key: str) -> Tuple[Union[str, List[str], None], Optional[str]]:
    """The text under `key`: a string, or a list of strings (sentences already split, as in
    Megatron-LM's pre-split format) without its blank items; or (None, reason)."""
    if isinstance(record, str):  # a text file's line is the text of every key
        value = record
    elif not isinstance(record, dict) or key not in record:
        return None, "missing_key"
    else:
        value = record[key]
    if isinstance(value, list):
        if not all(isinstance(item, str) for item in value):
            return None, "not_a_string"
        value = [item for item in value if item.strip()]
        return (value, None) if value else (None, "empty")
    if not isinstance(value, str):
        return None, "not_a_string"
    if not value.strip():
        return None, "empty"
    return value, None


# A key that is empty or missing in a record that has text under another key: kept as an empty
# document so that the outputs of several keys stay aligned, and reported as a warning.
KEPT_EMPTY = ("empty", "missing_key")


def process_batch(task):
    """Tokenise one batch. Returns per key (flat token array, doc lengths, sentence lengths),
    the skipped records as (line, reason), the records kept with an empty key as
    (line, key, reason), and the bytes read."""
    kind, records = task
    tok, keys, splitter = _W["tok"], _W["keys"], _W["splitter"]
    eod = tok.eod if _W["append_eod"] else None
    bad: List[Tuple[int, str]] = []
    kept_empty: List[Tuple[int, str, str]] = []
    other_keys: set = set()  # keys of records with nothing under --json-keys, for the error
    texts: Dict[str, list] = {k: [] for k in keys}
    nbytes = 0
    for number, raw in records:
        nbytes += len(raw) if isinstance(raw, (bytes, bytearray)) else 0
        record, reason = _record(kind, raw)
        if reason:
            bad.append((number, reason))
            continue
        values, empty = [], []
        for key in keys:
            text, reason = _value(record, key)
            if reason and reason not in KEPT_EMPTY:
                bad.append((number, reason))
                break
            if reason:
                empty.append((number, key, reason))
            values.append(text)
        else:
            if len(empty) == len(keys):  # no text under any key: no document is worth writing
                bad.append((number, empty[0][2]))
                if (
                    isinstance(record, dict)
                    and empty[0][2] == "missing_key"
                    and len(other_keys) < 20
                ):
                    other_keys.update(str(k) for k in record)
                continue
            kept_empty += empty
            for key, text in zip(keys, values, strict=True):
                texts[key].append(text)
    out = {}
    dtype = token_dtype(tok.vocab_size)
    for key in keys:
        # Every document's segments (sentences, or the whole text) are encoded in one call.
        segments, counts = [], []
        for text in texts[key]:
            if text is None:
                parts = []
            elif isinstance(text, list):  # already split: never split again
                parts = text
            elif splitter is None:
                parts = [text]
            else:
                parts = [s for s in splitter(text) if s.strip()] or [text]
            segments += parts
            counts.append(len(parts))
        pieces = iter(tok.encode_batch(segments) if segments else [])
        encoded, sentence_lengths = [], []
        for count in counts:
            # Segments that tokenise to nothing are no sentences (Megatron-LM drops them too);
            # an empty document is one empty sentence, so it still has an item to hold the EOD.
            doc = [p for p in itertools.islice(pieces, count) if p]
            lens = [len(p) for p in doc] or [0]
            ids = doc[0] if len(doc) == 1 else [i for p in doc for i in p]  # no copy if whole
            if eod is not None:
                ids.append(eod)
                lens[-1] += 1
            encoded.append(ids)
            sentence_lengths.append(lens)
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(
            itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum())
        )
        out[key] = (flat, lengths, sentence_lengths if splitter is not None else None)
    return out, bad, kept_empty, nbytes, sorted(other_keys)


# ---------------------------------------------------------------------------- parent side


@dataclass
class Stats:
    records: int = 0  # records read, bad ones included: what --max-documents counts
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    bad: Counter = field(default_factory=Counter)
    reported: List[str] = field(default_factory=list)
    kept_empty: Counter = field(default_factory=Counter)
    kept_reported: List[str] = field(default_factory=list)
    other_keys: set = field(default_factory=set)
    """Keys found in records that had none of --json-keys."""

    def add(self, other: Stats) -> None:
        self.records += other.records
        self.documents += other.documents
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.bad.update(other.bad)
        self.reported += other.reported[: MAX_REPORTED - len(self.reported)]
        self.kept_empty.update(other.kept_empty)
        self.kept_reported += other.kept_reported[: MAX_REPORTED - len(self.kept_reported)]
        self.other_keys |= other.other_keys


def _chunks(records, size: int):
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def _batches(pieces: List[Piece], limit: Optional[int] = None):
    """(piece, record count, task) for batches of records in input order; `limit` records at
    most (None: all)."""
    read = 0
    for piece in pieces:
        left = None if limit is None else limit - read
        if left == 0:
            return
        for records in _chunks(itertools.islice(read_piece(piece), left), BATCH_LINES):
            read += len(records)
            yield piece, len(records), (piece.kind, records)


def run_partition(
    pieces: List[Piece],
    prefixes: Dict[str, str],
    args,
    pool,
    progress,
    vocab_size: int,
    limit: Optional[int] = None,
) -> Stats:
    """Tokenise `pieces` (their first `limit` records) into one dataset per JSON key, in input
    order."""
    # Partition outputs of a merged run are intermediate: a killed earlier run's may be replaced.
    overwrite = args.overwrite or (args.partitions > 1 and args.partition_index is None)
    writers = {k: IndexedWriter(p, vocab_size, overwrite=overwrite) for k, p in prefixes.items()}
    stats = Stats()
    try:
        in_flight = deque()
        window = max(2, 4 * args.workers)

        def drain_one():
            piece, count, result = in_flight.popleft()
            out, bad, kept_empty, nbytes, other_keys = result.get() if pool is not None else result
            stats.other_keys.update(other_keys)
            stats.records += count
            stats.bytes += nbytes
            for number, reason in bad:
                stats.bad[reason] += 1
                where = f"{piece.path}:{number}"
                if args.strict:
                    raise DanubeConfigError(
                        f"{where}: {reason.replace('_', ' ')} (--strict); fix the record or drop "
                        f"--strict to skip bad records"
                    )
                if len(stats.reported) < MAX_REPORTED:
                    stats.reported.append(f"{where}: {reason.replace('_', ' ')}")
            for number, key, reason in kept_empty:
                stats.kept_empty[reason] += 1
                if len(stats.kept_reported) < MAX_REPORTED:
                    stats.kept_reported.append(
                        f"{piece.path}:{number}: {reason.replace('_', ' ')} under {key!r}"
                    )
            for key, (flat, lengths, sentence_lengths) in out.items():
                writers[key].add_batch(flat, lengths, sentence_lengths)
            first = next(iter(out.values()))
            stats.documents += len(first[1])
            stats.tokens += int(sum(int(v[1].sum()) for v in out.values()))
            progress.update(stats)

        for piece, count, task in _batches(pieces, limit):
            if pool is None:
                in_flight.append((piece, count, process_batch(task)))
            else:
                in_flight.append((piece, count, pool.apply_async(process_batch, (task,))))
            while len(in_flight) >= window:
                drain_one()
        while in_flight:
            drain_one()
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return stats


class Progress:
    """A tqdm bar with docs/s, tokens/s and MB/s (only where stderr is a terminal) and, every
    `log_interval` documents, a log line. Counts run over the whole run: `done` holds the
    partitions already finished, the `stats` passed to `update` the one in progress."""

    def __init__(self, total_bytes: int, enabled: bool, log_interval: Optional[int], done: Stats):
        self.t0 = time.perf_counter()
        self.bar = None
        self.last = 0.0
        self.interval = log_interval
        self.next_log = log_interval
        self.done = done
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                desc="preprocess",
                file=sys.stderr,
                mininterval=0.5,
            )

    def update(self, stats: Stats) -> None:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        documents = self.done.documents + stats.documents
        tokens = self.done.tokens + stats.tokens
        nbytes = self.done.bytes + stats.bytes
        # Results arrive a batch at a time: one line however many multiples a batch passes.
        if self.interval is not None and documents >= self.next_log:
            self.next_log = (documents // self.interval + 1) * self.interval
            logger.info(
                "%s documents, %s tokens, %.1f s elapsed (%s docs/s, %.1f MB/s)",
                f"{documents:,}",
                f"{tokens:,}",
                dt,
                f"{documents / dt:,.0f}",
                nbytes / dt / 1e6,
            )
        if self.bar is None or now - self.last < 0.5:
            return
        self.last = now
        self.bar.n = nbytes
        self.bar.set_postfix(
            docs_s=f"{documents / dt:,.0f}",
            tok_s=f"{tokens / dt:,.0f}",
            MB_s=f"{nbytes / dt / 1e6:.1f}",
            refresh=True,
        )

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="danube-preprocess",
        description="Tokenise a corpus into Megatron indexed datasets "
        "(PREFIX_KEY_document.bin/.idx)",
    )
    _add_input_arguments(p.add_argument_group("input"))
    _add_tokenizer_and_output_arguments(p)
    _add_runtime_arguments(p.add_argument_group("runtime"))
    return p


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
    g.add_argument(
        "--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="tokeniser processes"
    )
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


def output_prefix(base: str, key: str, level: str, partition: Optional[int] = None) -> str:
    part = f"_part{partition:03d}" if partition is not None else ""
    return f"{base}{part}_{key}_{level}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Progress and warnings go to stderr, where Megatron-LM prints them, unless the caller has
    # set up logging; only this module's INFO lines, not megatron-core's, are let through.
    logging.basicConfig(stream=sys.stderr, format="preprocess: %(message)s")
    logger.setLevel(logging.INFO)
    try:
        return _main(args)
    except DanubeConfigError as exc:
        _say(f"danube-preprocess: error: {exc}")
        return 2
    except ModuleNotFoundError as exc:
        if missing_extra_message(exc) is None:
            raise
        _say(f"danube-preprocess: error: {missing_extra_message(exc)}")
        return 2
    except KeyboardInterrupt:
        _say("danube-preprocess: interrupted; no output was written")
        return 130


def _check_args(args):
    """Everything cheap, before any work starts: (tokenizer, files, level, final prefixes)."""
    if args.workers < 1:
        raise DanubeConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.partitions < 1:
        raise DanubeConfigError(f"--partitions must be >= 1, got {args.partitions}")
    if args.partition_index is not None and not 0 <= args.partition_index < args.partitions:
        raise DanubeConfigError(
            f"--partition-index {args.partition_index} is outside 0..{args.partitions - 1}"
        )
    if args.max_documents is not None and args.max_documents < 1:
        raise DanubeConfigError(f"--max-documents must be >= 1, got {args.max_documents}")
    if args.max_documents is not None and args.partition_index is not None:
        raise DanubeConfigError(
            "--max-documents counts from the start of the whole input, which one "
            "--partition-index does not read; drop --partition-index or cut the input first"
        )
    if args.log_interval is not None and args.log_interval < 1:
        raise DanubeConfigError(f"--log-interval must be >= 1, got {args.log_interval}")
    tok = load_tokenizer(args.tokenizer_model, args.tokenizer_type)
    files = expand_inputs(args.input)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise DanubeConfigError(f"--output-prefix: directory {out_dir} does not exist; create it")
    level = "sentence" if args.split_sentences else "document"
    finals = {k: output_prefix(args.output_prefix, k, level) for k in args.json_keys}
    if args.partition_index is None and not args.overwrite:
        for prefix in finals.values():
            if dataset_exists(prefix):
                raise DanubeConfigError(
                    f"{prefix}.bin/.idx already exist; pass --overwrite or "
                    f"choose another --output-prefix"
                )
    if args.split_sentences:
        sentence_splitter(args.lang, quiet=False)
    return tok, files, level, finals


def _start_workers(args):
    """A pool of tokenising workers, or None where this process tokenises itself."""
    init = (
        args.tokenizer_model,
        args.tokenizer_type,
        args.json_keys,
        args.split_sentences,
        args.lang,
        args.append_eod,
        args.keep_newlines,
    )
    if args.workers > 1:
        return mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            args.workers, initializer=_init_worker, initargs=init
        )
    _init_worker(*init)
    return None


def _main(args) -> int:
    tok, files, level, finals = _check_args(args)
    partitions = make_partitions(files, args.partitions)
    todo = range(args.partitions) if args.partition_index is None else [args.partition_index]
    totals = Stats()
    progress = Progress(
        sum(os.path.getsize(f) for f in files),
        enabled=not args.no_progress and sys.stderr.isatty(),
        log_interval=args.log_interval,
        done=totals,
    )
    pool = _start_workers(args)
    t0 = time.perf_counter()
    done = []
    try:
        for index in todo:
            # Partitions run one after another, so --max-documents carries over from one to
            # the next; once it is reached the rest of the input is not read at all.
            limit = None if args.max_documents is None else args.max_documents - totals.records
            if limit == 0:
                break
            prefixes = finals
            if args.partitions > 1:
                prefixes = {
                    k: output_prefix(args.output_prefix, k, level, index) for k in args.json_keys
                }
            run = run_partition(
                partitions[index], prefixes, args, pool, progress, tok.vocab_size, limit
            )
            totals.add(run)
            done.append(index)
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    if args.partitions > 1 and args.partition_index is None:
        merge_partitions(args, finals, level, tok.vocab_size, done)
    _summarize(args, totals, time.perf_counter() - t0, finals)
    if totals.documents == 0 and args.partition_index is None:
        for prefix in finals.values():  # this run's own empty output: nothing to keep
            for ext in (".bin", ".idx"):
                if os.path.exists(prefix + ext):
                    os.remove(prefix + ext)
        raise DanubeConfigError(no_documents_message(args.json_keys, totals))
    return 0


def no_documents_message(json_keys: List[str], totals: Stats) -> str:
    keys = ", ".join(json_keys)
    if totals.records == 0:
        return "the input holds no records; nothing was written"
    if totals.other_keys:
        found = ", ".join(sorted(totals.other_keys)[:10])
        return (
            f"no document written: {totals.records:,} records, none with text under "
            f"--json-keys {keys} (their keys: {found}); pass --json-keys with the key that "
            f"holds the text"
        )
    reasons = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(totals.bad.items()))
    return (
        f"no document written: {totals.records:,} records, none usable under --json-keys "
        f"{keys} ({reasons}); see the records listed above"
    )


def _say(line: str) -> None:
    """The tool's summary: its result, on stderr as Megatron-LM's tool writes it."""
    sys.stderr.write(line + "\n")


def _summarize(args, totals, dt: float, finals) -> None:
    if args.max_documents is not None and totals.records == args.max_documents:
        logger.info(
            "stopped after the first %s input records (--max-documents)", f"{totals.records:,}"
        )
    _say(
        f"preprocess: {totals.documents:,} documents, {totals.tokens:,} tokens, "
        f"{totals.bytes / 1e6:.1f} MB in {dt:.1f} s "
        f"({totals.tokens / max(dt, 1e-9):,.0f} tokens/s, {args.workers} workers)"
    )
    if totals.bad:
        summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(totals.bad.items()))
        _say(f"preprocess: skipped {sum(totals.bad.values())} bad records ({summary}); first:")
        for line in totals.reported:
            _say(f"  {line}")
    if totals.kept_empty:
        summary = ", ".join(
            f"{n} {k.replace('_', ' ')}" for k, n in sorted(totals.kept_empty.items())
        )
        logger.warning(
            "kept %d records whose key was empty or missing as an empty document in "
            "that key's output, so that all outputs stay aligned (%s); first:\n%s",
            sum(totals.kept_empty.values()),
            summary,
            "\n".join(f"  {line}" for line in totals.kept_reported),
        )
    if args.partition_index is None and totals.documents:
        for prefix in finals.values():
            _say(f"wrote {prefix}.bin/.idx")


def merge_partitions(args, finals, level, vocab_size, indices: List[int]) -> None:
    for key, final in finals.items():
        parts = [output_prefix(args.output_prefix, key, level, i) for i in indices]
        with IndexedWriter(final, vocab_size, overwrite=args.overwrite) as writer:
            for part in parts:
                writer.add_prefix(part)
        if not args.keep_partitions:
            for part in parts:
                for ext in (".bin", ".idx"):
                    os.remove(part + ext)


if __name__ == "__main__":
    sys.exit(main())
