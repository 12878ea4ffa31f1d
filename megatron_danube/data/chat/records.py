"""Chat records from JSONL files: the formats TRL users have, bad lines reported as `file:line`.

Accepted per line (a JSON object):

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


def check_files(paths: List[str], what: str) -> List[str]:
    if isinstance(paths, str):
        paths = [paths]
    for path in paths:
        if not os.path.isfile(path):
            raise DanubeConfigError(f"{what}: {path} is not a file; give JSONL files")
    return [os.path.abspath(p) for p in paths]


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


def read_jsonl(paths: List[str], bad: BadRecords) -> Iterator[Tuple[str, int, object]]:
    """(path, line number, parsed object) per non-empty line; undecodable lines go to `bad`."""
    for path in paths:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    yield path, number, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    bad.add(where, "invalid UTF-8")
                except json.JSONDecodeError as exc:
                    bad.add(where, f"malformed JSON ({exc.msg})")
