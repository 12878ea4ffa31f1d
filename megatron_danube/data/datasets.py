"""Training data: megatron-core GPTDataset through BlendedMegatronDatasetBuilder, per stage.

Each stage has its own sequence length and blend, so each gets its own datasets. Samples are
addressed by index (the data position saved in checkpoints), so resuming anywhere in a stage
reads exactly the samples an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_danube.errors import DanubeConfigError


def parse_blend(blend: List, what: str = "data.blend") -> Tuple[List[str], Optional[List[float]]]:
    """Megatron-LM's `w1 prefix1 w2 prefix2` (or a single prefix) -> (prefixes, weights)."""
    if not blend:
        raise DanubeConfigError(
            f"{what} is empty; give [prefix] or [w1, prefix1, w2, prefix2, ...]"
        )
    if len(blend) == 1:
        return [str(blend[0])], None
    if len(blend) % 2:
        raise DanubeConfigError(f"{what} must alternate weight and prefix; got {len(blend)} items")
    weights, prefixes = blend[0::2], blend[1::2]
    for w, prefix in zip(weights, prefixes):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise DanubeConfigError(f"{what}: weight {w!r} of {prefix} is not a number")
        if w <= 0:
            raise DanubeConfigError(
                f"{what}: weight {w!r} of {prefix} must be > 0; remove the prefix to leave it out"
            )
    return [str(p) for p in prefixes], [float(w) for w in weights]


def check_prefixes(prefixes: List[str], what: str = "data.blend") -> None:
    """Each prefix has a .bin/.idx pair whose header and sizes agree."""
    from megatron_danube.data.indexed import check_indexed_files, sequence_count

    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise DanubeConfigError(
                    f"{what}: {prefix}{ext} not found; preprocess the corpus with "
                    f"tools/preprocess_data.py or fix the prefix"
                )
        check_indexed_files(prefix)
        if sequence_count(prefix) == 0:
            raise DanubeConfigError(
                f"{what}: {prefix} holds no documents; preprocess the corpus again (check "
                f"--json-keys against the records' keys) or drop it from {what}"
            )


def dataset_fingerprint(prefixes: List[str]) -> str:
    """A short hash of the datasets' identity (path, size and mtime of each .bin/.idx).

    Megatron caches its sample indices by config, not by file contents: a corpus re-made under
    the same prefix would silently reuse indices built for the old one. Keying the cache
    folder by this fingerprint makes a changed dataset rebuild its indices.
    """
    digest = hashlib.sha256()
    for prefix in prefixes:
        for ext in (".idx", ".bin"):
            st = os.stat(prefix + ext)
            digest.update(f"{os.path.abspath(prefix)}{ext}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


class _TokenizerInfo:
    """What GPTDataset reads from a tokenizer (kept JSON-serialisable for its cache keys)."""

    def __init__(self, tokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.pad = -1
        self.unique_identifiers = tokenizer.unique_identifiers


def build_datasets(
    blend: List,
    *,
    seq_length: int,
    split: str,
    train_samples: int,
    valid_samples: int,
    tokenizer,
    seed: int,
    cache_dir: str,
):
    """(train, valid) GPTDatasets (blended where the blend has several prefixes)."""
    prefixes, weights = parse_blend(blend)
    check_prefixes(prefixes)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=os.path.join(cache_dir, dataset_fingerprint(prefixes)),
        tokenizer=_TokenizerInfo(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no [s, s] mask per sample
        mmap_bin_files=True,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    )
    train, valid, _ = builder.build()
    return train, valid


def microbatch_iterator(
    dataset, first_sample: int, count: int, micro_batch_size: int
) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield `count` samples from `first_sample` on, stacked into micro-batches."""
    vocab = dataset.config.tokenizer.vocab_size if hasattr(dataset, "config") else None
    for start in range(first_sample, first_sample + count, micro_batch_size):
        items = [dataset[i] for i in range(start, start + micro_batch_size)]
        batch = {
            key: torch.stack([torch.as_tensor(item[key]) for item in items])
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        if vocab is not None and int(batch["tokens"].max()) >= vocab:
            raise DanubeConfigError(
                f"the data holds token id {int(batch['tokens'].max())} but the tokenizer has "
                f"{vocab} tokens; the corpus was tokenized with another tokenizer: "
                f"re-preprocess it with data.tokenizer"
            )
        yield batch


def step_iterators(
    dataset,
    *,
    first_sample: int,
    global_batch: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
    num_chunks: int,
) -> List[Iterator]:
    """This DP rank's share of one global batch, one (identical) iterator per model chunk."""
    per_rank = global_batch // dp_size
    start = first_sample + dp_rank * per_rank
    batches = list(microbatch_iterator(dataset, start, per_rank, micro_batch_size))
    return [iter(batches) for _ in range(num_chunks)]
