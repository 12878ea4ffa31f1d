"""Tokenized chat samples stored flat, the form SFT conversations and DPO pairs share.

Below both `dataset` (conversations) and `preference` (pairs), which build them, so that
neither imports the other for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from megatron_danube.data.chat.encoder import EncodedSample


@dataclass
class ChatSamples:
    """Samples stored flat: sample i is `[offsets[i], offsets[i + 1])` of each array."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    offsets: np.ndarray
    stats: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.labels[a:b], self.loss_mask[a:b]

    def subset(self, indices: np.ndarray) -> ChatSamples:
        parts = [self.sample(int(i)) for i in indices]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p[0]) for p in parts])
        cat = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in range(3)]
        return ChatSamples(cat[0].astype(np.int32), cat[1].astype(np.int32), cat[2], offsets, {})

    def save(self, path: str) -> None:
        tmp = f"{path}.tmp{os.getpid()}.npz"
        np.savez(
            tmp,
            tokens=self.tokens,
            labels=self.labels,
            loss_mask=self.loss_mask,
            offsets=self.offsets,
            stats=np.frombuffer(json.dumps(self.stats).encode(), dtype=np.uint8),
        )
        os.replace(tmp, path)  # readers never see a half-written cache

    @classmethod
    def load(cls, path: str) -> ChatSamples:
        with np.load(path) as z:
            stats = json.loads(z["stats"].tobytes().decode())
            return cls(z["tokens"], z["labels"], z["loss_mask"], z["offsets"], stats)


def concatenate_samples(parts: List[EncodedSample], stats: dict) -> ChatSamples:
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in parts])

    def cat(name, dtype):
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype=dtype)

    return ChatSamples(
        cat("tokens", np.int32), cat("labels", np.int32), cat("loss_mask", np.uint8), offsets, stats
    )
