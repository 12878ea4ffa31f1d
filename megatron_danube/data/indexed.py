"""Write Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`) safely.

Output goes to temporary names next to the target and is renamed into place only when
`commit()` is called after the last document: an interrupted writer never leaves a pair that
looks complete. The `.bin` is renamed first and the `.idx` last, so a half-renamed pair has no
index and megatron refuses it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_danube.errors import DanubeConfigError


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


class IndexedWriter:
    def __init__(
        self, prefix: str, vocab_size: Optional[int] = None, overwrite: bool = False, dtype=None
    ):
        self.prefix = prefix
        if dataset_exists(prefix) and not overwrite:
            raise DanubeConfigError(
                f"{prefix}.bin/.idx already exist; choose another --output-prefix or pass "
                f"--overwrite"
            )
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise DanubeConfigError(f"output directory {directory} does not exist; create it first")
        self._tmp = f"{prefix}.tmp-{os.getpid()}"
        dtype = dtype if dtype is not None else token_dtype(vocab_size)
        self._builder = IndexedDatasetBuilder(self._tmp + ".bin", dtype=dtype)
        self.documents = 0
        self.tokens = 0
        self._done = False

    def add_document(self, ids: Sequence[int], sentence_lengths: Optional[Sequence[int]] = None):
        lengths = list(sentence_lengths) if sentence_lengths is not None else [len(ids)]
        self._builder.add_document(np.asarray(ids), lengths)
        self.documents += 1
        self.tokens += len(ids)

    def add_batch(self, flat: np.ndarray, doc_lengths: np.ndarray, sentence_lengths=None) -> None:
        """Many documents at once: one write for all their tokens."""
        b = self._builder
        b.data_file.write(np.ascontiguousarray(flat, dtype=b.dtype).tobytes(order="C"))
        if sentence_lengths is None:
            b.sequence_lengths.extend(doc_lengths.tolist())
            start = len(b.sequence_lengths) - len(doc_lengths)
            b.document_indices.extend(range(start + 1, len(b.sequence_lengths) + 1))
        else:
            for lens in sentence_lengths:
                b.sequence_lengths.extend(lens)
                b.document_indices.append(len(b.sequence_lengths))
        self.documents += len(doc_lengths)
        self.tokens += int(doc_lengths.sum())

    def add_prefix(self, prefix: str) -> None:
        """Append a whole existing dataset (used to merge partitions)."""
        self._builder.add_index(prefix)
        ds = IndexedDataset(prefix, mmap=False)  # an empty .bin cannot be memory-mapped
        self.documents += len(ds.document_indices) - 1
        self.tokens += int(ds.sequence_lengths.sum())

    def commit(self) -> None:
        self._builder.finalize(self._tmp + ".idx")
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        try:
            self._builder.data_file.close()
        except Exception:
            pass
        for ext in (".bin", ".idx"):
            if os.path.exists(self._tmp + ext):
                os.remove(self._tmp + ext)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 4, 7: 8, 8: 2}  # megatron's DType codes


def sequence_count(prefix: str) -> int:
    """Sequences (documents, or sentences at sentence level) the .idx header records."""
    with open(prefix + ".idx", "rb") as f:
        header = f.read(34)
    return int(np.frombuffer(header[18:26], dtype="<u8")[0])


def check_indexed_files(prefix: str) -> None:
    """The .idx header and the .bin size agree (cheap: reads the header and two numbers).

    Catches truncated or foreign files before a model is built, where megatron would fail
    later with a buffer error that names no file.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    fix = "re-run tools/preprocess_data.py for it"
    with open(idx, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:9] != _IDX_MAGIC:
        raise DanubeConfigError(f"{idx} is not a Megatron index file (bad header); {fix}")
    code = header[17]
    count, docs = np.frombuffer(header[18:34], dtype="<u8")
    itemsize = _DTYPE_SIZES.get(code)
    expected = 34 + 12 * int(count) + 8 * int(docs)
    if itemsize is None or os.path.getsize(idx) != expected:
        raise DanubeConfigError(f"{idx} is truncated or damaged (size mismatch); {fix}")
    if count:
        mm = np.memmap(idx, dtype=np.uint8, mode="r")
        last_size = int(np.frombuffer(mm[34 + 4 * (count - 1) : 34 + 4 * count], dtype="<i4")[0])
        ptr_at = 34 + 4 * int(count) + 8 * (int(count) - 1)
        last_ptr = int(np.frombuffer(mm[ptr_at : ptr_at + 8], dtype="<i8")[0])
        needed = last_ptr + last_size * itemsize
        if os.path.getsize(bin_) < needed:
            raise DanubeConfigError(
                f"{bin_} has {os.path.getsize(bin_)} bytes but its index needs {needed}; "
                f"the file is truncated; {fix}"
            )
