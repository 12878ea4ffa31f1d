"""Corpora into Megatron indexed datasets: Megatron-LM's flags and format, streamed, safe.

The parent process reads raw lines and hands batches to worker processes, keeping a bounded
number of batches in flight (memory does not grow with the corpus) and writing results in
input order (output is identical for any number of workers). Workers decode, parse, check,
split sentences and tokenise. Bad records are counted, reported with file:line and skipped,
or are fatal with `strict`. With several JSON keys the outputs stay aligned record for
record: a key that is empty or missing beside other keys with text gets an empty document,
reported as a warning. Output is renamed into place only on success.

`preprocess(PreprocessOptions(...))` runs it; `danube-preprocess` (cli/preprocess.py) is the
command around it. Messages name the command's flags, which the options' fields mirror.
"""

from __future__ import annotations

import itertools
import json
import logging
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
from megatron_danube.data.worker_pool import InlineWorkers, WorkerPool, serve_batches
from megatron_danube.errors import DanubeConfigError

BATCH_LINES = 512
MAX_REPORTED = 5

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """One tokenising process per CPU."""
    return max(1, (os.cpu_count() or 2))


@dataclass
class PreprocessOptions:
    """One run: what to read, how to tokenise it, where to write. Each field is the
    `danube-preprocess` flag of the same name (`--json-keys` is `json_keys`)."""

    input: List[str]
    """JSONL (.jsonl, .gz, .zst), parquet or text files, directories or globs."""
    tokenizer_model: str
    """SentencePiece .model, HF tokenizer directory, or mistral-v1."""
    output_prefix: str
    """Writes PREFIX_KEY_document.bin/.idx (PREFIX_KEY_sentence with `split_sentences`)."""
    json_keys: List[str] = field(default_factory=lambda: ["text"])
    """Keys to extract, one output each; a value is a string or a list of sentences."""
    split_sentences: bool = False
    """Store sentences as items (nltk punkt)."""
    keep_newlines: bool = False
    """With `split_sentences`, keep the whitespace between sentences, each with the one before."""
    lang: str = "english"
    """punkt language for `split_sentences`."""
    max_documents: Optional[int] = None
    """Read only the first N input records of the whole input (bad ones count); None: all."""
    tokenizer_type: Optional[str] = None
    """SentencePieceTokenizer or HuggingFaceTokenizer; None: inferred from `tokenizer_model`."""
    append_eod: bool = False
    """Append the EOS token to each document."""
    overwrite: bool = False
    """Replace existing outputs."""
    workers: int = field(default_factory=default_workers)
    """Tokenising processes; 1 tokenises in this process."""
    partitions: int = 1
    """Split the input into K parts (files or line ranges) processed one by one."""
    partition_index: Optional[int] = None
    """Process only this partition (SLURM arrays), without merging; None: all, merged."""
    keep_partitions: bool = False
    """Keep the per-partition outputs after merging."""
    strict: bool = False
    """Stop at the first record that would be skipped."""
    progress: bool = True
    """A progress bar, where stderr is a terminal."""
    log_interval: Optional[int] = None
    """Log counts and rates each time the document count passes a multiple of N; None: off."""


# ---------------------------------------------------------------------------- worker side


def sentence_splitter(
    lang: str, quiet: bool = True, keep_newlines: bool = False
) -> Callable[[str], List[str]]:
    """nltk punkt for `lang`; without punkt data (no downloads here), nltk's untrained Punkt.

    punkt drops the whitespace between sentences. With `keep_newlines` each sentence runs up to
    the start of the next one instead, so the newlines after it are tokenised with it (what
    Megatron-LM's --keep-newlines gives); the text after the last sentence is dropped, as punkt
    does. A run asks once with `quiet=False` (the check before any work), so it warns once.
    """
    import nltk.tokenize.punkt as punkt

    try:
        tokenizer = punkt.PunktTokenizer(lang)
    except (LookupError, OSError, ValueError):
        if not quiet:
            logger.warning(
                "nltk punkt data for %r is not installed; using nltk's untrained Punkt "
                "sentence splitter (python -m nltk.downloader punkt_tab installs the trained one)",
                lang,
            )
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


@dataclass
class _Batch:
    """One batch's records read and checked: the texts per key, and what was not kept whole."""

    texts: Dict[str, list]
    bad: List[Tuple[int, str]] = field(default_factory=list)
    """(line, reason) of the records skipped."""
    kept_empty: List[Tuple[int, str, str]] = field(default_factory=list)
    """(line, key, reason) of the keys kept as empty documents."""
    other_keys: set = field(default_factory=set)
    """Keys of records with nothing under the JSON keys, for the error naming them."""
    nbytes: int = 0


class BatchTokenizer:
    """A worker: the tokenizer and sentence splitter it loads, and the batches it tokenises.

    Made in the parent from the options alone; each process that tokenises loads its own copy
    on its first batch, so only the options cross to a worker process.
    """

    def __init__(self, options: PreprocessOptions):
        self.options = options
        self.tok = None
        self.splitter = None

    def _load(self) -> None:
        o = self.options
        self.tok = load_tokenizer(o.tokenizer_model, o.tokenizer_type)
        if o.split_sentences:
            self.splitter = sentence_splitter(o.lang, keep_newlines=o.keep_newlines)

    def serve(self, tasks, results) -> None:
        """A worker process's loop (see `worker_pool.serve_batches`)."""
        serve_batches(self, tasks, results)

    def process_batch(self, task):
        """Tokenise one batch. Returns per key (flat token array, doc lengths, sentence lengths),
        the skipped records as (line, reason), the records kept with an empty key as
        (line, key, reason), the bytes read, and the keys of records with no text under any
        JSON key."""
        if self.tok is None:
            self._load()
        batch = self._read(*task)
        out = {key: self._encode(texts) for key, texts in batch.texts.items()}
        return out, batch.bad, batch.kept_empty, batch.nbytes, sorted(batch.other_keys)

    def _read(self, kind: str, records) -> _Batch:
        batch = _Batch({k: [] for k in self.options.json_keys})
        for number, raw in records:
            batch.nbytes += len(raw) if isinstance(raw, (bytes, bytearray)) else 0
            record, reason = _record(kind, raw)
            if reason:
                batch.bad.append((number, reason))
            else:
                self._add(batch, number, record)
        return batch

    def _add(self, batch: _Batch, number: int, record) -> None:
        """One record's texts into `batch`, or the record into its skipped ones."""
        keys = self.options.json_keys
        values, empty = [], []
        for key in keys:
            text, reason = _value(record, key)
            if reason and reason not in KEPT_EMPTY:
                batch.bad.append((number, reason))
                return
            if reason:
                empty.append((number, key, reason))
            values.append(text)
        if len(empty) == len(keys):  # no text under any key: no document is worth writing
            reason = empty[0][2]
            batch.bad.append((number, reason))
            if isinstance(record, dict) and reason == "missing_key" and len(batch.other_keys) < 20:
                batch.other_keys.update(str(k) for k in record)
            return
        batch.kept_empty += empty
        for key, text in zip(keys, values, strict=True):
            batch.texts[key].append(text)

    def _segments(self, texts: list) -> Tuple[List[str], List[int]]:
        """Every document's segments (sentences, or the whole text), and how many each has."""
        segments, counts = [], []
        for text in texts:
            if text is None:
                parts = []
            elif isinstance(text, list):  # already split: never split again
                parts = text
            elif self.splitter is None:
                parts = [text]
            else:
                parts = [s for s in self.splitter(text) if s.strip()] or [text]
            segments += parts
            counts.append(len(parts))
        return segments, counts

    def _encode(self, texts: list):
        """(flat token array, doc lengths, sentence lengths or None) of one key's texts."""
        tok = self.tok
        eod = tok.eod if self.options.append_eod else None
        segments, counts = self._segments(texts)
        # All segments of the batch are encoded in one call.
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
            itertools.chain.from_iterable(encoded),
            dtype=token_dtype(tok.vocab_size),
            count=int(lengths.sum()),
        )
        return flat, lengths, sentence_lengths if self.splitter is not None else None


def start_workers(options: PreprocessOptions):
    """Tokenising worker processes, or this process where `options.workers` is 1."""
    worker = BatchTokenizer(options)
    if options.workers > 1:
        return WorkerPool(worker, options.workers)
    return InlineWorkers(worker)


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

    def add_bad(self, where: str, reason: str, strict: bool) -> None:
        """A skipped record at `where` (file:line); fatal with `strict`."""
        self.bad[reason] += 1
        if strict:
            raise DanubeConfigError(
                f"{where}: {reason.replace('_', ' ')} (--strict); fix the record or drop "
                f"--strict to skip bad records"
            )
        if len(self.reported) < MAX_REPORTED:
            self.reported.append(f"{where}: {reason.replace('_', ' ')}")

    def add_kept_empty(self, where: str, key: str, reason: str) -> None:
        self.kept_empty[reason] += 1
        if len(self.kept_reported) < MAX_REPORTED:
            self.kept_reported.append(f"{where}: {reason.replace('_', ' ')} under {key!r}")


@dataclass
class Result:
    """What a run did."""

    stats: Stats
    """Counts over every partition processed."""
    seconds: float
    """From the workers' start to the end of the merge."""
    prefixes: List[str]
    """The final datasets, one prefix per JSON key (a `partition_index` run writes only its
    part of them)."""


class NoDocumentsWritten(DanubeConfigError):
    """No record had text under the JSON keys; the run's own empty outputs are removed."""

    def __init__(self, message: str, result: Result):
        super().__init__(message)
        self.result = result


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
    options: PreprocessOptions,
    workers,
    progress,
    vocab_size: int,
    limit: Optional[int] = None,
) -> Stats:
    """Tokenise `pieces` (their first `limit` records) into one dataset per JSON key, in input
    order."""
    # Partition outputs of a merged run are intermediate: a killed earlier run's may be replaced.
    overwrite = options.overwrite or (options.partitions > 1 and options.partition_index is None)
    writers = {k: IndexedWriter(p, vocab_size, overwrite=overwrite) for k, p in prefixes.items()}
    stats = Stats()
    try:
        in_flight = deque()
        window = max(2, 4 * options.workers)
        for piece, count, task in _batches(pieces, limit):
            in_flight.append((piece, count, workers.submit(task)))
            while len(in_flight) >= window:
                _write(*in_flight.popleft(), writers, stats, options.strict)
                progress.update(stats)
        while in_flight:
            _write(*in_flight.popleft(), writers, stats, options.strict)
            progress.update(stats)
        for w in writers.values():
            w.commit()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return stats


def _write(piece: Piece, count: int, pending, writers, stats: Stats, strict: bool) -> None:
    """One batch's result, waited for, into the writers and `stats`."""
    out, bad, kept_empty, nbytes, other_keys = pending()
    stats.other_keys.update(other_keys)
    stats.records += count
    stats.bytes += nbytes
    for number, reason in bad:
        stats.add_bad(f"{piece.path}:{number}", reason, strict)
    for number, key, reason in kept_empty:
        stats.add_kept_empty(f"{piece.path}:{number}", key, reason)
    for key, (flat, lengths, sentence_lengths) in out.items():
        writers[key].add_batch(flat, lengths, sentence_lengths)
    first = next(iter(out.values()))
    stats.documents += len(first[1])
    stats.tokens += int(sum(int(v[1].sum()) for v in out.values()))


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


def output_prefix(base: str, key: str, level: str, partition: Optional[int] = None) -> str:
    part = f"_part{partition:03d}" if partition is not None else ""
    return f"{base}{part}_{key}_{level}"


def check_options(options: PreprocessOptions):
    """Everything cheap, before any work starts: (tokenizer, files, level, final prefixes)."""
    o = options
    if o.workers < 1:
        raise DanubeConfigError(f"--workers must be >= 1, got {o.workers}")
    if o.partitions < 1:
        raise DanubeConfigError(f"--partitions must be >= 1, got {o.partitions}")
    if o.partition_index is not None and not 0 <= o.partition_index < o.partitions:
        raise DanubeConfigError(
            f"--partition-index {o.partition_index} is outside 0..{o.partitions - 1}"
        )
    if o.max_documents is not None and o.max_documents < 1:
        raise DanubeConfigError(f"--max-documents must be >= 1, got {o.max_documents}")
    if o.max_documents is not None and o.partition_index is not None:
        raise DanubeConfigError(
            "--max-documents counts from the start of the whole input, which one "
            "--partition-index does not read; drop --partition-index or cut the input first"
        )
    if o.log_interval is not None and o.log_interval < 1:
        raise DanubeConfigError(f"--log-interval must be >= 1, got {o.log_interval}")
    tok = load_tokenizer(o.tokenizer_model, o.tokenizer_type)
    files = expand_inputs(o.input)
    return (tok, files, *_check_outputs(o))


def _check_outputs(options: PreprocessOptions):
    """(level, final prefixes), once the output directory and the splitter are known good."""
    out_dir = os.path.dirname(os.path.abspath(options.output_prefix))
    if not os.path.isdir(out_dir):
        raise DanubeConfigError(f"--output-prefix: directory {out_dir} does not exist; create it")
    level = "sentence" if options.split_sentences else "document"
    finals = {k: output_prefix(options.output_prefix, k, level) for k in options.json_keys}
    if options.partition_index is None and not options.overwrite:
        for prefix in finals.values():
            if dataset_exists(prefix):
                raise DanubeConfigError(
                    f"{prefix}.bin/.idx already exist; pass --overwrite or "
                    f"choose another --output-prefix"
                )
    if options.split_sentences:
        sentence_splitter(options.lang, quiet=False)
    return level, finals


def preprocess(options: PreprocessOptions) -> Result:
    """Check the options, tokenise the partitions asked for and merge them. Bad options or
    input raise DanubeConfigError (NoDocumentsWritten, with the result, when no record had
    text); nothing is left behind that looks like a finished dataset."""
    tok, files, level, finals = check_options(options)
    totals = Stats()
    progress = Progress(
        sum(os.path.getsize(f) for f in files),
        enabled=options.progress and sys.stderr.isatty(),
        log_interval=options.log_interval,
        done=totals,
    )
    workers = start_workers(options)
    t0 = time.perf_counter()
    try:
        done = _run_partitions(options, files, level, tok.vocab_size, workers, progress, totals)
    finally:
        progress.close()
        workers.close()
    if options.partitions > 1 and options.partition_index is None:
        merge_partitions(options, finals, level, tok.vocab_size, done)
    result = Result(totals, time.perf_counter() - t0, list(finals.values()))
    if totals.documents == 0 and options.partition_index is None:
        for prefix in finals.values():  # this run's own empty output: nothing to keep
            for ext in (".bin", ".idx"):
                if os.path.exists(prefix + ext):
                    os.remove(prefix + ext)
        raise NoDocumentsWritten(no_documents_message(options.json_keys, totals), result)
    return result


def _run_partitions(options, files, level, vocab_size, workers, progress, totals) -> List[int]:
    """Tokenise the partitions in turn into `totals`; the indices of those done."""
    o = options
    partitions = make_partitions(files, o.partitions)
    done = []
    for index in range(o.partitions) if o.partition_index is None else [o.partition_index]:
        # Partitions run one after another, so --max-documents carries over from one to
        # the next; once it is reached the rest of the input is not read at all.
        limit = None if o.max_documents is None else o.max_documents - totals.records
        if limit == 0:
            break
        part = index if o.partitions > 1 else None
        prefixes = {k: output_prefix(o.output_prefix, k, level, part) for k in o.json_keys}
        totals.add(
            run_partition(partitions[index], prefixes, o, workers, progress, vocab_size, limit)
        )
        done.append(index)
    return done


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


def merge_partitions(options, finals, level, vocab_size, indices: List[int]) -> None:
    for key, final in finals.items():
        parts = [output_prefix(options.output_prefix, key, level, i) for i in indices]
        with IndexedWriter(final, vocab_size, overwrite=options.overwrite) as writer:
            for part in parts:
                writer.add_prefix(part)
        if not options.keep_partitions:
            for part in parts:
                for ext in (".bin", ".idx"):
                    os.remove(part + ext)
