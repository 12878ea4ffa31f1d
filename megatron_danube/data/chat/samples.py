"""Tokenized chat samples stored flat, the form SFT conversations and DPO pairs share.

On disk a set is a directory of raw arrays (`tokens.bin`, `labels.bin`: int32; `loss_mask.bin`:
uint8; `offsets.npy`: int64, sample i is `[offsets[i], offsets[i + 1])`) and `stats.json`.
`SampleWriter` appends samples as they are encoded, so building needs memory for one batch,
not the data; `ChatSamples.load` maps the files, so every rank of a node shares one copy in
the page cache and holds in its own memory only the offsets. A subset (the held-out share) is
an index into the same arrays.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from megatron_danube.data.chat.encoder import EncodedSample

ARRAYS = (("tokens", np.int32), ("labels", np.int32), ("loss_mask", np.uint8))
OFFSETS, STATS = "offsets.npy", "stats.json"


class DamagedSamples(ValueError):
    """A sample directory whose files do not agree with each other (cut short, overwritten)."""


@dataclass
class ChatSamples:
    """Samples stored flat: sample i is `[offsets[j], offsets[j + 1])` of each array, where j
    is i, or `index[i]` for a subset."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    stats: dict
    index: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    @property
    def lengths(self) -> np.ndarray:
        lengths = np.diff(self.offsets)
        return lengths if self.index is None else lengths[self.index]

    def sample(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        j = i if self.index is None else int(self.index[i])
        a, b = self.offsets[j], self.offsets[j + 1]
        return self.tokens[a:b], self.labels[a:b], self.loss_mask[a:b]

    def subset(self, indices: np.ndarray) -> ChatSamples:
        """Samples `indices` of these, in that order, sharing the arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        index = indices if self.index is None else self.index[indices]
        return ChatSamples(self.tokens, self.labels, self.loss_mask, self.offsets, {}, index)

    def save(self, path: str) -> None:
        writer = SampleWriter(path)
        for i in range(len(self)):
            writer.add_arrays(*self.sample(i))
        writer.finish(self.stats)

    @classmethod
    def load(cls, path: str) -> ChatSamples:
        """The set in directory `path`, memory-mapped; DamagedSamples where its files do not
        agree (a cache cut short or overwritten)."""
        try:
            with open(os.path.join(path, STATS)) as f:
                stats = json.load(f)
            offsets = np.load(os.path.join(path, OFFSETS))
        except (OSError, ValueError, EOFError) as exc:
            raise DamagedSamples(f"{type(exc).__name__}: {exc}") from None
        total = int(offsets[-1]) if len(offsets) else -1
        if len(offsets) != stats.get("stored_samples", -1) + 1 or total != stats.get(
            "stored_tokens"
        ):
            raise DamagedSamples(f"offsets.npy does not match {STATS}")
        arrays = {}
        for name, dtype in ARRAYS:
            file = os.path.join(path, f"{name}.bin")
            size = os.path.getsize(file) if os.path.exists(file) else -1
            if size != total * np.dtype(dtype).itemsize:
                raise DamagedSamples(f"{name}.bin holds {size} bytes, {total} tokens expected")
            arrays[name] = (
                np.memmap(file, dtype=dtype, mode="r", shape=(total,))
                if total
                else np.zeros(0, dtype=dtype)
            )
        return cls(arrays["tokens"], arrays["labels"], arrays["loss_mask"], offsets, stats)


@dataclass
class SampleBatch:
    """Consecutive samples as one array each (what a worker sends back for a batch)."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray

    @classmethod
    def of(cls, samples: List[EncodedSample]) -> SampleBatch:
        def cat(name, dtype):
            arrays = [getattr(s, name) for s in samples]
            return (
                np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype)
            )

        return cls(
            cat("tokens", np.int32),
            cat("labels", np.int32),
            cat("loss_mask", np.uint8),
            np.asarray([len(s) for s in samples], dtype=np.int64),
        )


class SampleWriter:
    """Appends samples to a new sample directory: written under a temporary name and renamed
    by `finish`, so a reader never sees a half-written set."""

    def __init__(self, path: str):
        self.path = path
        self.tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.files = {name: open(os.path.join(self.tmp, f"{name}.bin"), "wb") for name, _ in ARRAYS}
        self.offsets: List[int] = [0]
        self.supervised = 0

    def add_batch(self, batch: SampleBatch) -> None:
        self.add_arrays(batch.tokens, batch.labels, batch.loss_mask, batch.lengths)

    def add_arrays(self, tokens, labels, loss_mask, lengths=None) -> None:
        """One sample, or with `lengths` consecutive samples of those lengths."""
        for (name, dtype), values in zip(ARRAYS, (tokens, labels, loss_mask)):
            self.files[name].write(np.ascontiguousarray(values, dtype=dtype).tobytes())
        if lengths is None:
            self.offsets.append(self.offsets[-1] + len(tokens))
        else:
            self.offsets.extend((self.offsets[-1] + np.cumsum(lengths)).tolist())
        self.supervised += int(np.asarray(loss_mask).sum())

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def finish(self, stats: dict) -> ChatSamples:
        for f in self.files.values():
            f.close()
        np.save(os.path.join(self.tmp, OFFSETS), np.asarray(self.offsets, dtype=np.int64))
        stats = dict(stats, stored_samples=len(self), stored_tokens=self.offsets[-1])
        with open(os.path.join(self.tmp, STATS), "w") as f:
            json.dump(stats, f)
        if os.path.exists(self.path):  # a damaged set being replaced
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return ChatSamples.load(self.path)

    def abandon(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
