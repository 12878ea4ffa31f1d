"""Corpora into Megatron indexed datasets: Megatron-LM's flags and format, streamed, safe.

The parent process reads raw lines and hands batches to a pool of workers, keeping a bounded
number of batches in flight (memory does not grow with the corpus) and writing results in
input order (output is identical for any number of workers). Workers decode, parse, check,
split sentences and tokenise. Bad records are counted, reported with file:line and skipped,
or are fatal with --strict. Output is renamed into place only on success.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_danube.data.indexed import IndexedWriter, dataset_exists, token_dtype
from megatron_danube.data.sources import Piece, expand_inputs, make_partitions, read_piece
from megatron_danube.data.tokenizer import load_tokenizer
from megatron_danube.errors import DanubeConfigError

BATCH_LINES = 512
MAX_REPORTED = 5
BAD_KINDS = ("malformed_json", "missing_key", "not_a_string", "invalid_utf8", "empty")


# ---------------------------------------------------------------------------- worker side

_W: Dict[str, object] = {}


def _init_worker(tokenizer_spec, tokenizer_type, keys, split_sentences, lang, append_eod):
    _W["tok"] = load_tokenizer(tokenizer_spec, tokenizer_type)
    _W["keys"] = keys
    _W["append_eod"] = append_eod
    _W["splitter"] = sentence_splitter(lang) if split_sentences else None


_SPLITTER_WARNED = False


def sentence_splitter(lang: str, quiet: bool = True):
    """nltk punkt for `lang`; without punkt data (no downloads here), nltk's untrained Punkt."""
    global _SPLITTER_WARNED
    import nltk.tokenize.punkt as punkt

    try:
        return punkt.PunktTokenizer(lang).tokenize
    except (LookupError, OSError, ValueError):
        if not quiet and not _SPLITTER_WARNED:
            print(
                f"preprocess: nltk punkt data for {lang!r} is not installed; using nltk's "
                f"untrained Punkt sentence splitter (python -m nltk.downloader punkt_tab "
                f"installs the trained one)",
                file=sys.stderr,
                flush=True,
            )
            _SPLITTER_WARNED = True
        return punkt.PunktSentenceTokenizer().tokenize


def _text_of(kind: str, raw, key: str) -> Tuple[Optional[str], Optional[str]]:
    """(text, None) or (None, reason)."""
    if kind == "parquet":
        value = raw.get(key) if isinstance(raw, dict) else None
        if key not in raw:
            return None, "missing_key"
    else:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8"
        if kind == "text":
            value = line.rstrip("\r\n")
        else:
            if not line.strip():
                return None, "empty"
            try:
                obj = json.loads(line)
            except ValueError:
                return None, "malformed_json"
            if not isinstance(obj, dict) or key not in obj:
                return None, "missing_key"
            value = obj[key]
    if not isinstance(value, str):
        return None, "not_a_string"
    if not value.strip():
        return None, "empty"
    return value, None


def process_batch(task):
    """Tokenise one batch. Returns per key: flat token array, doc lengths, sentence lengths."""
    kind, records = task
    tok, keys, splitter = _W["tok"], _W["keys"], _W["splitter"]
    eod = tok.eod if _W["append_eod"] else None
    bad: List[Tuple[int, str]] = []
    texts: Dict[str, List[str]] = {k: [] for k in keys}
    nbytes = 0
    for number, raw in records:
        nbytes += len(raw) if isinstance(raw, (bytes, bytearray)) else 0
        values = []
        for key in keys:
            text, reason = _text_of(kind, raw, key)
            if reason:
                bad.append((number, reason))
                break
            values.append(text)
        else:
            for key, text in zip(keys, values):
                texts[key].append(text)
    out = {}
    dtype = token_dtype(tok.vocab_size)
    for key in keys:
        docs = texts[key]
        if splitter is None:
            encoded = tok.encode_batch(docs) if docs else []
            sentence_lengths = None
        else:
            encoded, sentence_lengths = [], []
            for doc in docs:
                sentences = [s for s in splitter(doc) if s.strip()] or [doc]
                pieces = tok.encode_batch(sentences)
                lens = [len(p) for p in pieces]
                ids = [i for p in pieces for i in p]
                encoded.append(ids)
                sentence_lengths.append(lens)
        if eod is not None:
            for i, ids in enumerate(encoded):
                ids.append(eod)
                if sentence_lengths is not None:
                    sentence_lengths[i][-1] += 1
        lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype,
                           count=int(lengths.sum()))
        out[key] = (flat, lengths, sentence_lengths)
    return out, bad, nbytes


# ---------------------------------------------------------------------------- parent side


@dataclass
class Stats:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    bad: Counter = field(default_factory=Counter)
    reported: List[str] = field(default_factory=list)


def _batches(pieces: List[Piece]):
    for piece in pieces:
        records = []
        for number, raw in read_piece(piece):
            records.append((number, raw))
            if len(records) == BATCH_LINES:
                yield piece, (piece.kind, records)
                records = []
        if records:
            yield piece, (piece.kind, records)


def run_partition(pieces: List[Piece], prefixes: Dict[str, str], args, pool, progress,
                  vocab_size: int) -> Stats:
    """Tokenise `pieces` into one dataset per JSON key, in input order."""
    # Partition outputs of a merged run are intermediate: a killed earlier run's may be replaced.
    overwrite = args.overwrite or (args.partitions > 1 and args.partition_index is None)
    writers = {k: IndexedWriter(p, vocab_size, overwrite=overwrite) for k, p in prefixes.items()}
    stats = Stats()
    try:
        in_flight = deque()
        window = max(2, 4 * args.workers)

        def drain_one():
            piece, result = in_flight.popleft()
            out, bad, nbytes = result.get() if pool is not None else result
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
            for key, (flat, lengths, sentence_lengths) in out.items():
                writers[key].add_batch(flat, lengths, sentence_lengths)
            first = next(iter(out.values()))
            stats.documents += len(first[1])
            stats.tokens += int(sum(int(v[1].sum()) for v in out.values()))
            progress.update(stats)

        for piece, task in _batches(pieces):
            if pool is None:
                in_flight.append((piece, process_batch(task)))
            else:
                in_flight.append((piece, pool.apply_async(process_batch, (task,))))
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
    """A tqdm bar with docs/s, tokens/s and MB/s (stderr); silent when not a terminal."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.t0 = time.perf_counter()
        self.bar = None
        self.last = 0.0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                            file=sys.stderr, mininterval=0.5)

    def update(self, stats: Stats) -> None:
        if self.bar is None:
            return
        now = time.perf_counter()
        if now - self.last < 0.5:
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        self.bar.n = stats.bytes
        self.bar.set_postfix(docs_s=f"{stats.documents / dt:,.0f}", tok_s=f"{stats.tokens / dt:,.0f}",
                             MB_s=f"{stats.bytes / dt / 1e6:.1f}", refresh=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenise a corpus into Megatron indexed datasets (PREFIX_KEY_document.bin/.idx)",
    )
    g = p.add_argument_group("input")
    g.add_argument("--input", required=True, nargs="+",
                   help="JSONL (.jsonl, .gz, .zst), parquet or text files, directories or globs")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one output each)")
    g.add_argument("--split-sentences", action="store_true", help="store sentences as items (nltk punkt)")
    g.add_argument("--lang", default="english", help="punkt language for --split-sentences")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model, HF tokenizer directory, or mistral-v1")
    g.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer or HuggingFaceTokenizer (default: inferred)")
    g.add_argument("--append-eod", action="store_true", help="append the EOS token to each document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="tokeniser processes")
    g.add_argument("--partitions", type=int, default=1,
                   help="split the input into K parts (files or line ranges) processed one by one")
    g.add_argument("--partition-index", type=int, default=None,
                   help="process only this partition (SLURM arrays: $SLURM_ARRAY_TASK_ID); no merge")
    g.add_argument("--keep-partitions", action="store_true", help="keep per-partition outputs after merging")
    g.add_argument("--strict", action="store_true", help="stop at the first bad record")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--log-interval", type=int, default=None, help="accepted for Megatron-LM compatibility")
    return p


def output_prefix(base: str, key: str, level: str, partition: Optional[int] = None) -> str:
    part = f"_part{partition:03d}" if partition is not None else ""
    return f"{base}{part}_{key}_{level}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except DanubeConfigError as exc:
        print(f"preprocess_data.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output was written", file=sys.stderr)
        return 130


def _main(args) -> int:
    # Everything cheap is checked before any work starts.
    if args.workers < 1:
        raise DanubeConfigError(f"--workers must be >= 1, got {args.workers}")
    if args.partitions < 1:
        raise DanubeConfigError(f"--partitions must be >= 1, got {args.partitions}")
    if args.partition_index is not None and not 0 <= args.partition_index < args.partitions:
        raise DanubeConfigError(
            f"--partition-index {args.partition_index} is outside 0..{args.partitions - 1}"
        )
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
                raise DanubeConfigError(f"{prefix}.bin/.idx already exist; pass --overwrite or "
                                        f"choose another --output-prefix")
    if args.split_sentences:
        sentence_splitter(args.lang, quiet=False)

    partitions = make_partitions(files, args.partitions)
    todo = range(args.partitions) if args.partition_index is None else [args.partition_index]
    total_bytes = sum(os.path.getsize(f) for f in files)
    progress = Progress(total_bytes, enabled=not args.no_progress and sys.stderr.isatty())
    init = (args.tokenizer_model, args.tokenizer_type, args.json_keys, args.split_sentences,
            args.lang, args.append_eod)
    pool = None
    if args.workers > 1:
        pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
            args.workers, initializer=_init_worker, initargs=init)
    else:
        _init_worker(*init)
    t0 = time.perf_counter()
    totals = Stats()
    try:
        for index in todo:
            pieces = partitions[index]
            if args.partitions == 1:
                prefixes = finals
            else:
                prefixes = {k: output_prefix(args.output_prefix, k, level, index) for k in args.json_keys}
            stats = run_partition(pieces, prefixes, args, pool, progress, tok.vocab_size)
            totals.documents += stats.documents
            totals.tokens += stats.tokens
            totals.bytes += stats.bytes
            totals.bad.update(stats.bad)
            totals.reported += stats.reported[: MAX_REPORTED - len(totals.reported)]
    finally:
        progress.close()
        if pool is not None:
            pool.terminate()
    if args.partitions > 1 and args.partition_index is None:
        merge_partitions(args, finals, level, tok.vocab_size)
    dt = time.perf_counter() - t0
    print(f"preprocess: {totals.documents:,} documents, {totals.tokens:,} tokens, "
          f"{totals.bytes / 1e6:.1f} MB in {dt:.1f} s ({totals.tokens / max(dt, 1e-9):,.0f} tokens/s, "
          f"{args.workers} workers)", file=sys.stderr)
    if totals.bad:
        summary = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(totals.bad.items()))
        print(f"preprocess: skipped {sum(totals.bad.values())} bad records ({summary}); first:",
              file=sys.stderr)
        for line in totals.reported:
            print(f"  {line}", file=sys.stderr)
    for key, prefix in finals.items():
        if args.partition_index is None:
            print(f"wrote {prefix}.bin/.idx")
    return 0


def merge_partitions(args, finals, level, vocab_size) -> None:
    for key, final in finals.items():
        parts = [output_prefix(args.output_prefix, key, level, i) for i in range(args.partitions)]
        with IndexedWriter(final, vocab_size, overwrite=args.overwrite) as writer:
            for part in parts:
                writer.add_prefix(part)
        if not args.keep_partitions:
            for part in parts:
                for ext in (".bin", ".idx"):
                    os.remove(part + ext)


if __name__ == "__main__":
    sys.exit(main())
