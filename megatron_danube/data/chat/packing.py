"""Packing conversations into fixed-length rows, each conversation its own attention document.

A pack is a list of sample indices whose lengths sum to at most `seq_length`; it is laid out
as those samples back to back, then one padding document (never trained on) to fill the row.
A micro-batch of `b` packs is one THD row of `b * seq_length` tokens with `cu_seqlens` marking
every document, so attention, RoPE positions and labels all restart at each conversation (the
labels were shifted inside each sample before packing). Every micro-batch has the same shape,
as megatron's pipeline schedules require.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_danube.data.chat.dataset import ChatSamples

PACKINGS = ("bfd", "greedy", "none")


def greedy_packs(lengths: np.ndarray, order: np.ndarray, seq_length: int) -> List[List[int]]:
    """Fill packs in `order`; a sample that does not fit starts the next pack."""
    packs: List[List[int]] = []
    current: List[int] = []
    used = 0
    for index in order:
        n = int(lengths[index])
        if current and used + n > seq_length:
            packs.append(current)
            current, used = [], 0
        current.append(int(index))
        used += n
    if current:
        packs.append(current)
    return packs


class _FreeSpace:
    """Packs by free space, answering "the fullest pack that still takes n tokens" in
    O(log seq_length): a max-tree over free-space values, a leaf holding its value while some
    pack has exactly that much room."""

    def __init__(self, seq_length: int):
        self.size = 1 << (seq_length + 1).bit_length()
        self.tree = [0] * (2 * self.size)
        self.packs: Dict[int, List[int]] = {}

    def _mark(self, free: int, present: bool) -> None:
        i = free + self.size
        self.tree[i] = free if present else 0
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def add(self, pack: int, free: int) -> None:
        if free <= 0:
            return  # full: never a candidate
        bucket = self.packs.setdefault(free, [])
        bucket.append(pack)
        if len(bucket) == 1:
            self._mark(free, True)

    def take_best_fit(self, n: int) -> Optional[Tuple[int, int]]:
        """(pack, its free space) of the pack with the least room >= n, removed; None if none."""
        if self.tree[1] < n:
            return None
        i = 1
        while i < self.size:  # the leftmost leaf whose value is >= n: the least room that fits
            i = 2 * i if self.tree[2 * i] >= n else 2 * i + 1
        free = i - self.size
        bucket = self.packs[free]
        pack = bucket.pop()
        if not bucket:
            self._mark(free, False)
        return pack, free


def bfd_packs(lengths: np.ndarray, seq_length: int) -> List[List[int]]:
    """Best-fit decreasing: longest first, each into the fullest pack it fits, else a new one.
    Deterministic for given lengths (ties broken by sample index)."""
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    packs: List[List[int]] = []
    space = _FreeSpace(seq_length)
    for index in order:
        n = int(lengths[index])
        found = space.take_best_fit(n)
        if found is None:
            packs.append([int(index)])
            space.add(len(packs) - 1, seq_length - n)
        else:
            pack, free = found
            packs[pack].append(int(index))
            space.add(pack, free - n)
    return packs


def epoch_packs(
    lengths: np.ndarray, seq_length: int, *, epochs: int, seed: int, packing: str, shuffle: bool
) -> List[List[int]]:
    """The packs of every epoch, in training order, each epoch shuffled with seed + epoch.

    `bfd`: best-fit-decreasing packs (the same packs every epoch), in shuffled order; `greedy`:
    samples in shuffled order, filled front to back; `none`: one sample per row.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing {packing!r}: choose one of {PACKINGS}")
    fitted = bfd_packs(lengths, seq_length) if packing == "bfd" else None
    packs: List[List[int]] = []
    for epoch in range(epochs):
        rng = np.random.default_rng(seed + epoch)
        if fitted is not None:
            order = rng.permutation(len(fitted)) if shuffle else np.arange(len(fitted))
            packs.extend(fitted[i] for i in order)
            continue
        order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
        if packing == "greedy":
            packs.extend(greedy_packs(lengths, order, seq_length))
        else:
            packs.extend([[int(i)] for i in order])
    return packs


def fill_rate(lengths: np.ndarray, packs: List[List[int]], seq_length: int) -> float:
    """The share of the packs' rows that holds tokens (not padding)."""
    used = sum(int(lengths[i]) for pack in packs for i in pack)
    return used / max(len(packs) * seq_length, 1)


def packed_microbatch(
    samples: ChatSamples, packs: List[List[int]], seq_length: int, pad_id: int
) -> Dict[str, torch.Tensor]:
    """One THD micro-batch: [1, len(packs) * seq_length] tensors and the document bounds.

    An empty pack (`[]`) is all padding: it fills a global batch that the data ran out for.
    """
    tokens, labels, mask, positions, bounds = [], [], [], [], [0]
    for pack in packs:
        used = 0
        for index in pack:
            t, lab, m = samples.sample(index)
            tokens.append(t)
            labels.append(lab)
            mask.append(m)
            positions.append(np.arange(len(t)))
            used += len(t)
            bounds.append(bounds[-1] + len(t))
        pad = seq_length - used
        if pad:
            tokens.append(np.full(pad, pad_id, dtype=np.int32))
            labels.append(np.full(pad, pad_id, dtype=np.int32))
            mask.append(np.zeros(pad, dtype=np.uint8))
            positions.append(np.arange(pad))
            bounds.append(bounds[-1] + pad)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    return {
        "tokens": torch.from_numpy(np.concatenate(tokens).astype(np.int64)).unsqueeze(0),
        "labels": torch.from_numpy(np.concatenate(labels).astype(np.int64)).unsqueeze(0),
        "loss_mask": torch.from_numpy(np.concatenate(mask).astype(np.float32)).unsqueeze(0),
        "position_ids": torch.from_numpy(np.concatenate(positions)).unsqueeze(0),
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
    }
