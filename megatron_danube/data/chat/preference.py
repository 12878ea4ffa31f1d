"""Preference pairs for DPO: the formats TRL users have, tokenized like SFT samples.

Accepted per JSONL line:

* `{"prompt": ..., "chosen": ..., "rejected": ...}`: the prompt a string (a user turn, with an
  optional `"system"`) or a message list; chosen and rejected strings (the assistant's reply)
  or message lists;
* ranked lists (Oasst-style): `{"prompt": ..., "responses": [...], "ranks": [...]}`, rank 0
  the best (without `ranks` the list is ordered best first); the pair is the best-ranked
  response against the worst-ranked one.

Each pair is stored as two samples, chosen at `2i` and rejected at `2i + 1`, both rendered in
full by the chat template; only the completion (the messages after the prompt) is supervised.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from megatron_danube.data.chat.encoder import ChatEncoder, SampleError, check_messages
from megatron_danube.data.chat.records import BadRecords, read_jsonl
from megatron_danube.data.chat.samples import ChatSamples, concatenate_samples
from megatron_danube.data.chat.template import ROLES

Pair = Tuple[List[dict], List[dict], List[dict]]  # prompt, chosen completion, rejected completion


def _prompt_messages(record: dict) -> List[dict]:
    prompt, system = record.get("prompt"), record.get("system")
    if system is not None and not isinstance(system, str):
        raise SampleError("`system` must be a string")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return messages
    if system is not None:
        raise SampleError("`system` goes with a string `prompt`; put it in the message list")
    if isinstance(prompt, list) and prompt:
        return prompt
    raise SampleError("`prompt` must be a string or a non-empty list of messages")


def _completion(value, key: str) -> List[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value:
        return value
    raise SampleError(f"`{key}` must be a string or a non-empty list of messages")


def _ranked(record: dict) -> Tuple[object, object]:
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise SampleError("`responses` must list at least two responses")
    ranks = record.get("ranks", list(range(len(responses))))
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise SampleError("`ranks` must give one rank per response")
    if not all(_is_rank(r) for r in ranks):
        raise SampleError("`ranks` must be finite numbers (0: the best response)")
    if min(ranks) == max(ranks):
        raise SampleError("every response has the same rank: no preference to learn")
    best = min(range(len(ranks)), key=lambda i: ranks[i])
    worst = max(range(len(ranks)), key=lambda i: ranks[i])
    return responses[best], responses[worst]


def _is_rank(value) -> bool:
    """A real, finite number (JSON booleans and NaN are not ranks)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def pair_of(record) -> Pair:
    """(prompt, chosen, rejected) messages of a record, checked; SampleError otherwise."""
    if not isinstance(record, dict):
        raise SampleError("not a JSON object")
    if "responses" in record:
        chosen, rejected = _ranked(record)
    elif "chosen" in record and "rejected" in record:
        chosen, rejected = record["chosen"], record["rejected"]
    else:
        raise SampleError(
            "no `chosen`/`rejected` and no ranked `responses`; see the README's preference formats"
        )
    prompt = _prompt_messages(record)
    chosen_msgs = _completion(chosen, "chosen")
    rejected_msgs = _completion(rejected, "rejected")
    prompt = check_messages(prompt + chosen_msgs, ROLES)[: len(prompt)]
    if chosen_msgs == rejected_msgs:
        raise SampleError("chosen and rejected are the same")
    chosen_msgs = check_messages(prompt + chosen_msgs, ROLES)[len(prompt) :]
    rejected_msgs = check_messages(prompt + rejected_msgs, ROLES)[len(prompt) :]
    return prompt, chosen_msgs, rejected_msgs


def encode_pair_files(paths: List[str], encoder: ChatEncoder, what: str) -> ChatSamples:
    """Every record's pair, chosen at 2i and rejected at 2i + 1; bad records counted, skipped."""
    bad = BadRecords()
    parts, stats = [], {"records": 0, "no_supervised_tokens": 0, "truncated": 0}
    for path, number, record in read_jsonl(paths, bad):
        stats["records"] += 1
        try:
            prompt, chosen, rejected = pair_of(record)
            pair = [
                encoder.encode(prompt + c, supervise_from=len(prompt)) for c in (chosen, rejected)
            ]
        except SampleError as exc:
            bad.add(f"{path}:{number}", str(exc))
            continue
        stats["truncated"] += sum(int(s.truncated) for s in pair)
        if min(s.supervised for s in pair) == 0:
            stats["no_supervised_tokens"] += 1  # truncation cut a whole completion
            continue
        parts.extend(pair)
    stats["records"] += bad.count - (
        stats["records"] - len(parts) // 2 - stats["no_supervised_tokens"]
    )
    stats.update(bad_records=bad.count, bad_examples=bad.examples)
    samples = concatenate_samples(parts, stats)
    stats.update(samples=len(samples) // 2, tokens=int(samples.offsets[-1]))
    stats["supervised"] = int(samples.loss_mask.sum())
    return samples


def pair_lengths(samples: ChatSamples) -> np.ndarray:
    lengths = samples.lengths
    return lengths[0::2] + lengths[1::2]
