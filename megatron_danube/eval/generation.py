"""Greedy generation through the forward-only scorer: no KV cache, each new token recomputes
its whole sequence.

Requests are shared among the data-parallel replicas; each replica extends its open rows by one
token per schedule pass and closes a row at EOS, at a stop string or at its token budget. Every
rank gets every request's generated ids, in the requests' order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_danube.eval.scoring import ForwardScorer, Row


@dataclass(frozen=True)
class GreedyRequest:
    context: Sequence[int]
    """The prompt's ids (already cut to leave room for the budget)."""
    max_new_tokens: int
    stops: Sequence[str]
    """Generation ends once the decoded new text holds one of these."""


def generate_greedy(
    scorer: ForwardScorer,
    requests: List[GreedyRequest],
    decode: Callable[[List[int]], str],
    eos_id: int,
) -> List[List[int]]:
    """The new ids of each request, on every rank."""
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank, dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
    mine = list(range(len(requests)))[dp_rank::dp_size]
    local = list(zip(mine, _generate_here(scorer, [requests[i] for i in mine], decode, eos_id)))
    shares = [None] * dp_size
    dist.all_gather_object(shares, local, group=dp_group)
    generated: List[List[int]] = [[] for _ in requests]
    for share in shares:
        for index, ids in share:
            generated[index] = ids
    return generated


def _generate_here(scorer, requests, decode, eos_id) -> List[List[int]]:
    """This replica's requests, every rank of it in step (all take the same decisions from
    the same broadcast tokens)."""
    new: List[List[int]] = [[] for _ in requests]
    open_rows = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
    while open_rows:
        rows = []
        for i in open_rows:
            tokens = list(requests[i].context) + new[i]
            rows.append(Row(tokens, [0] * len(tokens), len(tokens)))  # nothing scored
        for i, score in zip(open_rows, scorer.score_here(rows)):
            new[i].append(score.next_token)
        open_rows = [i for i in open_rows if not _finished(requests[i], new[i], decode, eos_id)]
    return new


def _finished(request: GreedyRequest, new: List[int], decode, eos_id: int) -> bool:
    if new[-1] == eos_id or len(new) >= request.max_new_tokens:
        return True
    if request.stops:
        text = decode(new)
        return any(stop in text for stop in request.stops)
    return False
