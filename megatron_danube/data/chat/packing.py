"""Packing conversations into fixed-length rows, each conversation its own attention document.

A pack is a list of sample indices whose lengths sum to at most `seq_length`; it is laid out
as those samples back to back, then one padding document (never trained on) to fill the row.
A micro-batch of `b` packs is one THD row of `b * seq_length` tokens with `cu_seqlens` marking
every document, so attention, RoPE positions and labels all restart at each conversation (the
labels were shifted inside each sample before packing). Every micro-batch has the same shape,
as megatron's pipeline schedules require.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from megatron_danube.data.chat.dataset import ChatSamples


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


def epoch_packs(
    lengths: np.ndarray, seq_length: int, *, epochs: int, seed: int, pack: bool, shuffle: bool
) -> List[List[int]]:
    """The packs of every epoch, in training order (each epoch shuffled with its own seed)."""
    packs: List[List[int]] = []
    for epoch in range(epochs):
        order = np.arange(len(lengths))
        if shuffle:
            order = np.random.default_rng(seed + epoch).permutation(len(lengths))
        if pack:
            packs.extend(greedy_packs(lengths, order, seq_length))
        else:
            packs.extend([[int(i)] for i in order])
    return packs


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
