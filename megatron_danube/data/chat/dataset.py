"""Tokenized chat samples: built once per (data, tokenizer, template, sequence length), cached.

The cache file's name is a hash of the JSONL files' bytes and of everything the encoding
depends on (`ChatEncoder.identity`), so an edited file or another template never reuses stale
ids. Counts of what was skipped or cut are kept with the samples and reported at every start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from typing import List, Optional, Tuple

from megatron_danube.data.chat.encoder import ChatEncoder, EncodedSample, SampleError
from megatron_danube.data.chat.preference import encode_pair_files
from megatron_danube.data.chat.records import BadRecords, messages_of, read_jsonl
from megatron_danube.data.chat.samples import ChatSamples, concatenate_samples
from megatron_danube.errors import DanubeConfigError

logger = logging.getLogger(__name__)

# What reading a truncated or overwritten .npz raises (zipfile's BadZipFile is an OSError
# subclass only in some versions; numpy raises ValueError or EOFError on short arrays).
DAMAGED_CACHE = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)

CACHE_VERSION = 1


def files_digest(paths: List[str]) -> str:
    from megatron_danube.data.chat.records import content_blocks

    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        for block in content_blocks(path):
            digest.update(block)
    return digest.hexdigest()


def cache_key(paths: List[str], encoder: ChatEncoder, kind: str = "sft") -> str:
    identity = hashlib.sha256(encoder.identity().encode()).hexdigest()
    return hashlib.sha256(
        f"v{CACHE_VERSION}|{kind}|{files_digest(paths)}|{identity}".encode()
    ).hexdigest()[:20]


def encode_files(paths: List[str], encoder: ChatEncoder, what: str) -> ChatSamples:
    """Read, render, tokenize and mask every record; bad ones are counted and skipped."""
    bad = BadRecords()
    parts: List[EncodedSample] = []
    stats = {"records": 0, "bad_records": 0, "no_supervised_tokens": 0, "truncated": 0}
    for path, number, record in read_jsonl(paths, bad):
        stats["records"] += 1
        try:
            sample = encoder.encode(messages_of(record))
        except SampleError as exc:
            bad.add(f"{path}:{number}", str(exc))
            continue
        stats["truncated"] += int(sample.truncated)
        if sample.supervised == 0:
            # e.g. left truncation cut every assistant token: nothing would be learned
            stats["no_supervised_tokens"] += 1
            continue
        parts.append(sample)
    rejected_records = stats["records"] - len(parts) - stats["no_supervised_tokens"]
    stats["records"] += bad.count - rejected_records  # lines that were not even JSON
    stats["bad_records"] = bad.count
    stats["bad_examples"] = bad.examples
    samples = concatenate_samples(parts, stats)
    stats.update(samples=len(samples), tokens=int(samples.offsets[-1]))
    stats["supervised"] = int(samples.loss_mask.sum())
    return samples


def load_or_build(
    paths: List[str],
    encoder: ChatEncoder,
    cache_dir: str,
    what: str,
    build: bool,
    kind: str = "sft",
) -> Tuple[Optional[ChatSamples], str]:
    """(samples, cache path). With `build`, encode and write the cache when it is missing;
    without, only read it (other ranks, after the builder). `kind`: `sft` conversations or
    `dpo` preference pairs."""
    path = os.path.join(cache_dir, f"{kind}-{cache_key(paths, encoder, kind)}.npz")
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
    if kind == "dpo":
        samples = encode_pair_files(paths, encoder, what)
    else:
        samples = encode_files(paths, encoder, what)
    samples.save(path)
    return samples, path


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
