"""Tokenized chat samples: built once per (data, tokenizer, template, sequence length), cached.

The cache file's name is a hash of the JSONL files' bytes and of everything the encoding
depends on (`ChatEncoder.identity`), so an edited file or another template never reuses stale
ids. Counts of what was skipped or cut are kept with the samples and reported at every start.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
import zipfile
from collections import deque
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from megatron_danube.data.chat.encoder import ChatEncoder, SampleError
from megatron_danube.data.chat.preference import pair_of
from megatron_danube.data.chat.records import (
    BadRecords,
    messages_of,
    parse_line,
    read_raw_records,
)
from megatron_danube.data.chat.samples import (
    ChatSamples,
    DamagedSamples,
    SampleBatch,
    SampleWriter,
)
from megatron_danube.errors import DanubeConfigError

logger = logging.getLogger(__name__)

# What reading a damaged cache or DPO reference file raises (zipfile's BadZipFile is an OSError
# subclass only in some versions; numpy raises ValueError or EOFError on short arrays).
DAMAGED_CACHE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, DamagedSamples)

CACHE_VERSION = 2  # 2: a directory of memory-mapped arrays (1: one .npz)
RECORDS_PER_TASK = 256  # records a worker encodes per task
PROGRESS_EVERY_S = 30.0


def files_digest(paths: List[str]) -> str:
    from megatron_danube.data.chat.records import content_blocks

    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        for block in content_blocks(path):
            digest.update(block)
    return digest.hexdigest()


def cache_key(
    paths: List[str], encoder: ChatEncoder, kind: str = "sft", version: int = CACHE_VERSION
) -> str:
    identity = hashlib.sha256(encoder.identity().encode()).hexdigest()
    return hashlib.sha256(
        f"v{version}|{kind}|{files_digest(paths)}|{identity}".encode()
    ).hexdigest()[:20]


def data_identity(paths: List[str], encoder: ChatEncoder, kind: str = "sft") -> str:
    """The tokenized data's name in a run's records (DPO keys its reference log-probabilities
    by it): the cache file name of the first format, kept so that recorded keys stay valid."""
    return f"{kind}-{cache_key(paths, encoder, kind, version=1)}.npz"


class RecordEncoder:
    """A worker: a batch of records (a JSONL line's bytes, or a dataset row) -> one outcome per
    record, each ("ok", samples, truncated) with its number of samples, ("empty", truncated)
    for one left with no supervised token, or ("bad", where, reason); and the samples of the
    "ok" ones in order, as one `SampleBatch`. `kind` sft: a conversation is one sample; dpo:
    a preference pair is two (chosen, then rejected)."""

    def __init__(self, encoder: ChatEncoder, kind: str):
        self.encoder, self.kind = encoder, kind

    def process_batch(self, records: List[Tuple[str, object]]) -> tuple:
        # Checked records' conversations go to the tokenizer in one call; a record's samples
        # are consecutive there (a pair's chosen, then its rejected).
        checked, conversations = [], []
        for where, record in records:
            try:
                if isinstance(record, bytes):
                    record = parse_line(record)
                if self.kind == "dpo":
                    prompt, chosen, rejected = pair_of(record)
                    parts = [(prompt + c, len(prompt)) for c in (chosen, rejected)]
                else:
                    parts = [(messages_of(record), 0)]
            except SampleError as exc:
                checked.append(("bad", where, str(exc)))
                continue
            checked.append(("parts", where, len(parts)))
            conversations.extend(parts)
        encoded = iter(self.encoder.encode_many(conversations))
        outcomes, kept = [], []
        for kind, where, n in checked:
            outcome = (kind, where, n)
            if kind == "parts":
                samples = [next(encoded) for _ in range(n)]
                outcome = self._outcome(where, samples)
                if outcome[0] == "ok":
                    kept.extend(samples)
            outcomes.append(outcome)
        return outcomes, SampleBatch.of(kept)

    @staticmethod
    def _outcome(where: str, samples: list) -> tuple:
        failed = next((s for s in samples if isinstance(s, SampleError)), None)
        if failed is not None:
            return ("bad", where, str(failed))
        truncated = sum(int(s.truncated) for s in samples)
        if min(s.supervised for s in samples) == 0:
            # e.g. left truncation cut every assistant token: nothing would be learned
            return ("empty", truncated)
        return ("ok", len(samples), truncated)


def encode_files(
    paths: List[str],
    encoder: ChatEncoder,
    what: str,
    *,
    kind: str = "sft",
    workers: int = 1,
    directory: Optional[str] = None,
) -> ChatSamples:
    """Read, render, tokenize and mask every record (`workers` processes; the result is the
    same for any number); bad ones are counted and skipped. With `directory`, the samples are
    written there as they come (memory for a few batches) and mapped back; else kept in memory.
    """
    from megatron_danube.data.worker_pool import InlineWorkers, WorkerPool

    bad = BadRecords()
    stats = {"records": 0, "bad_records": 0, "no_supervised_tokens": 0, "truncated": 0}
    sink = SampleWriter(directory) if directory else _InMemory()
    # JSON is parsed in the workers: the reading process only splits lines.
    records = ((f"{path}:{number}", raw) for path, number, raw in read_raw_records(paths))
    batches = _batches(records, RECORDS_PER_TASK)
    first = next(batches, [])
    worker = RecordEncoder(encoder, kind)
    pool = InlineWorkers(worker)
    if workers > 1 and len(first) == RECORDS_PER_TASK:  # more than one batch: worth processes
        # Each worker encodes one conversation at a time; tokenizers' own threads would only
        # contend with the other workers (and warn after the fork).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # spawn: the encoding rank is a training process, with threads (see WorkerPool).
        pool = WorkerPool(worker, workers, what="chat encoding", fork=False)
    progress = _Progress(what)
    try:
        pending = deque()
        for batch in itertools.chain([first], batches):
            if not batch:
                continue
            pending.append(pool.submit(batch))
            while len(pending) > 2 * max(workers, 1):  # a bounded number of batches in flight
                _collect(pending.popleft()(), sink, stats, bad, progress)
        while pending:
            _collect(pending.popleft()(), sink, stats, bad, progress)
    except BaseException:
        if directory:
            sink.abandon()
        raise
    finally:
        pool.close()
    stats["bad_examples"] = bad.examples
    stored = len(sink)
    stats.update(
        samples=stored // 2 if kind == "dpo" else stored,
        tokens=int(sink.offsets[-1]),
        supervised=int(sink.supervised),
    )
    progress.done(stats)
    return sink.finish(stats)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    while True:
        batch = list(itertools.islice(items, size))
        if not batch:
            return
        yield batch


def _collect(result: tuple, sink, stats: dict, bad: BadRecords, progress) -> None:
    outcomes, samples = result
    for outcome in outcomes:
        stats["records"] += 1
        if outcome[0] == "bad":
            bad.add(outcome[1], outcome[2])
            stats["bad_records"] += 1
            continue
        stats["truncated"] += outcome[-1]
        if outcome[0] == "empty":
            stats["no_supervised_tokens"] += 1
    sink.add_batch(samples)
    progress.update(stats["records"], int(sink.offsets[-1]))


class _InMemory:
    """`SampleWriter`'s interface, keeping the samples in memory."""

    def __init__(self):
        self.batches: List[SampleBatch] = []
        self.offsets = [0]
        self.supervised = 0

    def add_batch(self, batch: SampleBatch) -> None:
        self.batches.append(batch)
        self.offsets.extend((self.offsets[-1] + np.cumsum(batch.lengths)).tolist())
        self.supervised += int(batch.loss_mask.sum())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def finish(self, stats: dict) -> ChatSamples:
        def cat(name):
            return np.concatenate([getattr(b, name) for b in self.batches] or [np.zeros(0)])

        return ChatSamples(
            cat("tokens").astype(np.int32),
            cat("labels").astype(np.int32),
            cat("loss_mask").astype(np.uint8),
            np.asarray(self.offsets, dtype=np.int64),
            stats,
        )


class _Progress:
    """A log line every PROGRESS_EVERY_S seconds while a large set is encoded."""

    def __init__(self, what: str):
        self.what, self.start = what, time.perf_counter()
        self.last = self.start

    def update(self, records: int, tokens: int) -> None:
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = records / (now - self.start)
            logger.info(
                "encoding %s: %s records, %s tokens (%.0f records/s)",
                self.what,
                f"{records:,}",
                f"{tokens:,}",
                rate,
            )

    def done(self, stats: dict) -> None:
        seconds = time.perf_counter() - self.start
        logger.info(
            "encoded %s: %s records in %.1f s (%s tokens/s)",
            self.what,
            f"{stats['records']:,}",
            seconds,
            f"{stats['tokens'] / max(seconds, 1e-9):,.0f}",
        )


def load_or_build(
    paths: List[str],
    encoder: ChatEncoder,
    cache_dir: str,
    what: str,
    build: bool,
    kind: str = "sft",
    workers: int = 1,
) -> Tuple[Optional[ChatSamples], str]:
    """(samples, cache path). With `build`, encode and write the cache when it is missing;
    without, only read it (other ranks, after the builder). `kind`: `sft` conversations or
    `dpo` preference pairs."""
    path = os.path.join(cache_dir, f"{kind}-{cache_key(paths, encoder, kind)}")
    if os.path.exists(path):
        try:
            return ChatSamples.load(path), path
        except DAMAGED_CACHE as exc:
            if not build:
                raise DanubeConfigError(
                    f"data cache {path} is damaged ({type(exc).__name__}); remove it and run "
                    f"again (it is rebuilt from chat files)"
                ) from None
            # Derived data: rebuilt from the files it was made of.
            logger.warning("data cache %s is damaged (%s); rebuilding it", path, exc)
    if not build:
        return None, path
    os.makedirs(cache_dir, exist_ok=True)
    samples = encode_files(paths, encoder, what, kind=kind, workers=workers, directory=path)
    return samples, path


def shared_samples(
    sets: Dict[str, List[str]],
    encoder: ChatEncoder,
    cache_dir: str,
    *,
    kind: str,
    workers: int,
    is_main: bool,
    node_main: bool,
    barrier: Callable[[], None],
) -> Dict[str, ChatSamples]:
    """Every set's samples on every rank of a launch, encoded once: rank 0 builds the caches;
    then the first rank of each other node maps them, or builds its node's own where it cannot
    see them (no shared file system); then every rank maps them (one copy per node in the
    page cache)."""
    loaded: Dict[str, ChatSamples] = {}
    for builds in (is_main, node_main and not is_main):
        if builds:
            for name, paths in sets.items():
                loaded[name], _ = load_or_build(
                    paths, encoder, cache_dir, name, True, kind=kind, workers=workers
                )
        barrier()
    for name, paths in sets.items():
        if name not in loaded:
            loaded[name], path = load_or_build(paths, encoder, cache_dir, name, False, kind=kind)
            if loaded[name] is None:
                raise DanubeConfigError(f"data cache {path} is missing after it was built")
    return loaded


def describe(stats: dict) -> str:
    """One line of counts; the first bad records (file:line: reason) when there were any."""
    text = (
        f"{stats.get('samples', 0):,} samples, {stats.get('tokens', 0):,} tokens "
        f"({stats.get('supervised', 0):,} supervised); skipped {stats.get('bad_records', 0)} bad "
        f"record(s) and {stats.get('no_supervised_tokens', 0)} without a supervised token; "
        f"{stats.get('truncated', 0)} truncated"
    )
    if stats.get("bad_examples"):
        text += "; first bad: " + "; ".join(stats["bad_examples"])
    return text
