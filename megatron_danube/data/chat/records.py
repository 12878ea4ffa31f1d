"""Chat records as users hold them, in the formats TRL users have; bad ones reported by place.

Inputs: JSONL files, plain or compressed (`.gz`, `.zst`, by extension), streamed line by line
and reported as `file:line`; and datasets saved by HF `datasets`' `save_to_disk` (a directory
with `state.json`, `dataset_info.json` and arrow files), memory-mapped and read row by row,
reported as `DIR:row N` (N counts from 0, as `dataset[N]` does). A `DatasetDict` directory is
refused: one split's directory (`DIR/train`) is one input.

Accepted per record (a JSON object, or a dataset row):

* `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (multi-turn);
* `{"prompt": "...", "response": "..."}` (or `"completion"`), with an optional `"system"`;
* TRL's conversational prompt-completion: `"prompt"` and `"completion"` as message lists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

from megatron_danube.data.chat.encoder import SampleError, check_messages
from megatron_danube.data.chat.template import ROLES
from megatron_danube.data.sources import open_binary
from megatron_danube.errors import DanubeConfigError

SHOWN_BAD_RECORDS = 5


@dataclass
class BadRecords:
    """Counts skipped records; keeps the first few as `file:line: reason`."""

    count: int = 0
    examples: List[str] = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < SHOWN_BAD_RECORDS:
            self.examples.append(f"{where}: {reason}")


INPUT_KINDS = "JSONL files (.jsonl, .jsonl.gz, .jsonl.zst) or datasets saved with save_to_disk"
SAVED_DATASET_MARKERS = ("state.json", "dataset_info.json")
DATASET_DICT_MARKER = "dataset_dict.json"


def check_files(paths: List[str], what: str) -> List[str]:
    """The inputs as absolute paths, each a readable JSONL file or a saved dataset's directory;
    DanubeConfigError naming the fix otherwise."""
    if isinstance(paths, str):
        paths = [paths]
    for path in paths:
        if os.path.isdir(path):
            _check_saved_dataset(path, what)
        elif not os.path.isfile(path):
            raise DanubeConfigError(f"{what}: {path} does not exist; give {INPUT_KINDS}")
        elif path.lower().endswith(".zst"):
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise DanubeConfigError(
                    f'{what}: {path}: .zst needs the zstandard package; pip install -e ".[data]"'
                ) from None
    return [os.path.abspath(p) for p in paths]


def _check_saved_dataset(path: str, what: str) -> None:
    dict_marker = os.path.join(path, DATASET_DICT_MARKER)
    if os.path.isfile(dict_marker):
        with open(dict_marker) as f:
            splits = json.load(f).get("splits", [])
        example = os.path.join(path, splits[0] if splits else "train")
        raise DanubeConfigError(
            f"{what}: {path} is a DatasetDict with splits {', '.join(splits) or '(none)'}; "
            f"give one split's directory, e.g. {example}"
        )
    if not all(os.path.isfile(os.path.join(path, m)) for m in SAVED_DATASET_MARKERS):
        raise DanubeConfigError(
            f"{what}: {path} is a directory but not a dataset saved with save_to_disk (no "
            f"{' and '.join(SAVED_DATASET_MARKERS)}); give {INPUT_KINDS}"
        )
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DanubeConfigError(
            f"{what}: {path} is a saved dataset, which needs the datasets package; "
            f'pip install -e ".[data]"'
        ) from None


def saved_dataset_files(path: str) -> List[str]:
    """A saved dataset's arrow files, in row order (as its state.json lists them)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    return [os.path.join(path, entry["filename"]) for entry in state["_data_files"]]


def content_blocks(path: str, block_size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes that identify an input, in blocks: a file's own bytes; for a saved dataset,
    each arrow file's name and size, then its bytes (the arrow files carry the features too,
    while state.json's fingerprint differs between saves of the same rows)."""
    files = saved_dataset_files(path) if os.path.isdir(path) else None
    for name in files if files is not None else [path]:
        if files is not None:
            yield f"{os.path.basename(name)}\0{os.path.getsize(name)}\0".encode()
        with open(name, "rb") as f:
            while block := f.read(block_size):
                yield block


def _as_assistant(value, key: str) -> List[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        return value
    raise SampleError(f"`{key}` must be a string or a list of messages")


def messages_of(record) -> List[dict]:
    """The conversation a record holds, checked; SampleError otherwise."""
    if not isinstance(record, dict):
        raise SampleError("not a JSON object")
    if "messages" in record:
        return check_messages(record["messages"], ROLES)
    answer_key = "response" if "response" in record else "completion"
    if "prompt" not in record or answer_key not in record:
        raise SampleError(
            "no `messages`, and no `prompt` with `response`/`completion`; see the README's "
            "chat data formats"
        )
    prompt = record["prompt"]
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif isinstance(prompt, list):
        messages = list(prompt)
    else:
        raise SampleError("`prompt` must be a string or a list of messages")
    return check_messages(messages + _as_assistant(record[answer_key], answer_key), ROLES)


class RowNumber(int):
    """A saved dataset's row index: an int, written `row N` where a record is named
    (`DIR:row N`), as a line number is written `N` (`file:N`)."""

    def __str__(self) -> str:
        return f"row {int(self)}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def read_records(paths: List[str], bad: BadRecords) -> Iterator[Tuple[str, int, object]]:
    """(input, line number or RowNumber, record) per record, streamed: a JSONL line (plain,
    .gz or .zst) or a saved dataset's row. Lines that are not JSON go to `bad`."""
    for path, number, record in read_raw_records(paths):
        if isinstance(record, bytes):
            try:
                record = parse_line(record)
            except SampleError as exc:
                bad.add(f"{path}:{number}", str(exc))
                continue
        yield path, number, record


def read_raw_records(paths: List[str]) -> Iterator[Tuple[str, int, object]]:
    """As `read_records`, but a JSONL line comes as its bytes, for `parse_line` where the
    record is used (in an encoding worker, not in the process that reads)."""
    for path in paths:
        if os.path.isdir(path):
            yield from _read_saved_dataset(path)
        else:
            yield from _read_jsonl_lines(path)


def parse_line(raw: bytes):
    """A JSONL line's record; SampleError naming what is wrong with the line."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SampleError("invalid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise SampleError(f"malformed JSON ({exc.msg})") from None


def _read_jsonl_lines(path: str) -> Iterator[Tuple[str, int, bytes]]:
    with open_binary(path) as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield path, number, raw


def _read_saved_dataset(path: str) -> Iterator[Tuple[str, RowNumber, dict]]:
    import datasets

    dataset = datasets.load_from_disk(path)
    if not isinstance(dataset, datasets.Dataset):  # check_files refuses these first
        raise DanubeConfigError(f"{path} holds several splits; give one split's directory")
    # Plain Python rows whatever format the set was saved with; iterating reads the
    # memory-mapped arrow files a small batch at a time, never the whole set.
    for index, row in enumerate(dataset.with_format(None)):
        # A column a row does not use is null there (arrow has no absent keys): drop it, so
        # the row reads as the JSONL record without that key would.
        yield path, RowNumber(index), {k: v for k, v in row.items() if v is not None}
