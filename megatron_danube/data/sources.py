"""Streaming readers for corpus files, and their division into partitions.

A *piece* is a unit of input: a whole file, or a byte range of a plain (uncompressed) JSONL or
text file, cut at line boundaries. Pieces in order are the corpus in order, so partitions made
of consecutive pieces, merged in order, reproduce the unpartitioned output exactly.

Readers yield `(line_number, raw)`: raw bytes for line formats (decoded and parsed by the
workers, so the reader stays cheap), or a `str`/object for parquet rows.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from megatron_danube.errors import DanubeConfigError

LINE_SUFFIXES = (".jsonl", ".json", ".txt", ".text")
COMPRESSED = (".gz", ".zst")


@dataclass(frozen=True)
class Piece:
    path: str
    start: int = 0
    end: Optional[int] = None  # None: to the end of the file
    first_line: int = 1  # line number of the first line in this piece (for error reports)

    @property
    def kind(self) -> str:
        return file_kind(self.path)


def file_kind(path: str) -> str:
    name = path.lower()
    for comp in COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text")):
        return "text"
    return "jsonl"


def expand_inputs(inputs: List[str]) -> List[str]:
    """Files named, globbed or found (recursively, sorted) under directories."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(item)
                for f in names
                if f.lower().endswith(
                    tuple(s + c for s in LINE_SUFFIXES + (".parquet",) for c in ("",) + COMPRESSED)
                )
            )
            if not found:
                raise DanubeConfigError(
                    f"--input {item}: directory has no .jsonl/.txt/.parquet files"
                )
            files += found
        elif any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise DanubeConfigError(f"--input {item}: the pattern matches no files")
            files += found
        else:
            if not os.path.isfile(item):
                raise DanubeConfigError(f"--input {item}: no such file or directory")
            files.append(item)
    for f in files:
        if not os.access(f, os.R_OK):
            raise DanubeConfigError(f"--input {f}: not readable (check permissions)")
        if f.lower().endswith(".zst"):
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise DanubeConfigError(
                    f'--input {f}: .zst needs the zstandard package; pip install -e ".[data]"'
                ) from None
        if file_kind(f) == "parquet":
            try:
                import pyarrow  # noqa: F401  (availability check)
            except ImportError:
                raise DanubeConfigError(
                    f'--input {f}: parquet needs pyarrow; pip install -e ".[data]"'
                ) from None
    return files


def _splittable(path: str) -> bool:
    return file_kind(path) in ("jsonl", "text") and not path.lower().endswith(COMPRESSED)


def _line_start_at_or_after(f, offset: int) -> int:
    if offset == 0:
        return 0
    f.seek(offset - 1)
    f.readline()
    return f.tell()


def make_partitions(files: List[str], partitions: int) -> List[List[Piece]]:
    """Split the corpus into `partitions` runs of consecutive pieces of similar size."""
    if partitions <= 1:
        return [[Piece(f) for f in files]]
    sizes = [os.path.getsize(f) for f in files]
    total = max(sum(sizes), 1)
    target = total / partitions
    bounds = [round(target * i) for i in range(1, partitions)]  # global byte offsets
    parts: List[List[Piece]] = [[] for _ in range(partitions)]
    offset = 0
    for path, size in zip(files, sizes):
        if not _splittable(path):
            middle = offset + size / 2
            index = sum(1 for b in bounds if b <= middle)
            parts[index].append(Piece(path))
            offset += size
            continue
        cuts = [b - offset for b in bounds if offset < b < offset + size]
        with open(path, "rb") as f:
            positions = [0] + [_line_start_at_or_after(f, c) for c in cuts] + [size]
            # line numbers at each cut, for error reports
            line_numbers, line, pos = [1], 1, 0
            f.seek(0)
            for p in positions[1:-1]:
                line += f.read(p - pos).count(b"\n")
                pos = p
                line_numbers.append(line)
        first_index = sum(1 for b in bounds if b <= offset)
        for k, (start, end) in enumerate(zip(positions[:-1], positions[1:])):
            if end > start:
                parts[first_index + k].append(Piece(path, start, end, line_numbers[k]))
        offset += size
    return parts


def open_binary(path: str):
    """A binary file object over a file's decompressed bytes (`.gz`, `.zst` by extension);
    iterating it yields lines, never the whole file."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def read_piece(piece: Piece) -> Iterator[Tuple[int, object]]:
    if piece.kind == "parquet":
        import pyarrow.parquet as pq

        reader = pq.ParquetFile(piece.path)
        row = 0
        for batch in reader.iter_batches(batch_size=1024):
            data = batch.to_pydict()
            n = batch.num_rows
            for i in range(n):
                row += 1
                yield row, {k: v[i] for k, v in data.items()}
        return
    with open_binary(piece.path) as f:
        if piece.start:
            f.seek(piece.start)
        pos, number = piece.start, piece.first_line
        for raw in f:
            if piece.end is not None and pos >= piece.end:
                break
            pos += len(raw)
            yield number, raw
            number += 1
