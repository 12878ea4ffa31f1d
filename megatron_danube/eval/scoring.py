"""Score token rows with a Megatron model at any TP/PP/DP layout, forward only.

A row is a token sequence, the next token expected at each position, and the position from
which those predictions count. For each row the model gives the summed log-probability of the
counted targets, whether every counted target is the greedy choice, and the greedy token after
the row's last position (what generation appends). Rows go through megatron's pipeline
schedule (`get_forward_backward_func`, `forward_only=True`) in micro-batches; `score` splits
them over the data-parallel replicas and gives every rank all results in the rows' order.

Log-probabilities are computed over the true vocabulary only (the padded rows of the output
layer are left out of the softmax, as a Hugging Face export has none) and exactly under tensor
parallelism: each rank holds a slice of the vocabulary, and max, sum of exponentials, target
logit and argmax are reduced over the tensor-parallel group.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

PAD_ID = 0  # any id: padding sits right of every row and causal attention never reads it


@dataclass(frozen=True)
class Row:
    tokens: Sequence[int]
    """The model's input."""
    targets: Sequence[int]
    """The token expected after each input position (same length as `tokens`)."""
    scored_from: int
    """Predictions from this position on count; the ones before are context."""


@dataclass(frozen=True)
class RowScore:
    logprob: float
    """Summed log-probability of the counted targets."""
    greedy: bool
    """Whether every counted target is the most likely token."""
    next_token: int
    """The most likely token after the last input position."""


def vocab_parallel_logprob_and_argmax(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), argmax) at each position, from this rank's slice of the vocabulary.

    `logits` [..., v_local] is this tensor-parallel rank's slice of the padded vocabulary;
    entries at or past `vocab_size` are padding and take no part. The argmax is the lowest
    index holding the maximum, as `torch.argmax` over the whole row gives.
    """
    group = parallel_state.get_tensor_model_parallel_group()
    width = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * width
    columns = torch.arange(start, start + width, device=logits.device)
    logits = logits.float().masked_fill(columns >= vocab_size, float("-inf"))
    local_max, local_arg = logits.max(dim=-1)
    global_max = local_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = (logits - global_max.unsqueeze(-1)).exp().sum(dim=-1)
    dist.all_reduce(sum_exp, group=group)
    local_target = targets - start
    inside = (local_target >= 0) & (local_target < width)
    picked = logits.gather(-1, local_target.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    target_logit = torch.where(inside, picked, torch.zeros_like(picked))
    dist.all_reduce(target_logit, group=group)
    logprob = target_logit - global_max - sum_exp.log()
    # Ranks whose maximum is not the global one offer an index no real one reaches.
    candidate = torch.where(
        local_max == global_max, local_arg + start, torch.full_like(local_arg, 2**62)
    )
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return logprob, candidate


class ForwardScorer:
    """Runs rows through the model chunks of this rank; see the module docstring."""

    def __init__(self, chunks: List[torch.nn.Module], vocab_size: int, micro_batch_size: int):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size}; it must be >= 1")
        self.chunks, self.vocab_size, self.micro_batch_size = chunks, vocab_size, micro_batch_size
        self.device = next(chunks[0].parameters()).device
        # Enough micro-batches per schedule call to keep every pipeline stage busy.
        self.microbatches_per_call = parallel_state.get_pipeline_model_parallel_world_size()

    # ------------------------------------------------------------------------------ public
    def score(self, rows: List[Row]) -> List[RowScore]:
        """Every row's score on every rank, in the order of `rows`; each data-parallel
        replica computes a share (longest rows first, dealt in turn)."""
        dp_group = parallel_state.get_data_parallel_group()
        dp_rank, dp_size = dist.get_rank(dp_group), dist.get_world_size(dp_group)
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), i))
        mine = order[dp_rank::dp_size]
        local = list(zip(mine, self.score_here([rows[i] for i in mine])))
        shares = [None] * dp_size
        dist.all_gather_object(shares, local, group=dp_group)
        results: List[RowScore] = [None] * len(rows)  # type: ignore[list-item]
        for share in shares:
            for index, result in share:
                results[index] = result
        return results

    def score_here(self, rows: List[Row]) -> List[RowScore]:
        """The scores of `rows` on this replica alone (every rank of it calls this with the
        same rows); no data-parallel exchange."""
        with torch.no_grad(), _eval_mode(self.chunks):
            per_call = self.micro_batch_size * self.microbatches_per_call
            order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].tokens), i))
            results: List[RowScore] = [None] * len(rows)  # type: ignore[list-item]
            for first in range(0, len(order), per_call):
                indices = order[first : first + per_call]
                for index, result in zip(indices, self._call([rows[i] for i in indices])):
                    results[index] = result
            return results

    # ------------------------------------------------------------------------------ one call
    def _call(self, rows: List[Row]) -> List[RowScore]:
        """One schedule call: rows padded to one length, cut into equal micro-batches."""
        seq_length = max(len(r.tokens) for r in rows)
        tp = parallel_state.get_tensor_model_parallel_world_size()
        seq_length = -(-seq_length // tp) * tp  # sequence parallelism splits it over TP
        mbs = self.micro_batch_size
        count = -(-len(rows) // mbs)
        # Every micro-batch has mbs rows (the pipeline's message shape): repeat the last row.
        padded = rows + [rows[-1]] * (count * mbs - len(rows))
        batches = [self._batch(padded[i * mbs : (i + 1) * mbs], seq_length) for i in range(count)]
        iterators = [iter(batches) for _ in self.chunks]
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=count,
            seq_length=seq_length,
            micro_batch_size=mbs,
            forward_only=True,
        )
        scores = torch.zeros(count * mbs, 3, dtype=torch.float64, device=self.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            scores = torch.cat([item["scores"] for item in outputs])
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(
                scores,
                src=parallel_state.get_pipeline_model_parallel_last_rank(),
                group=parallel_state.get_pipeline_model_parallel_group(),
            )
        return [
            RowScore(float(s[0]), bool(s[1] > 0.5), int(s[2])) for s in scores[: len(rows)].cpu()
        ]

    def _batch(self, rows: List[Row], seq_length: int) -> Dict[str, torch.Tensor]:
        tokens = torch.full((len(rows), seq_length), PAD_ID, dtype=torch.long)
        targets = torch.full_like(tokens, PAD_ID)
        counted = torch.zeros_like(tokens, dtype=torch.bool)
        last = torch.zeros(len(rows), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.tokens)
            tokens[i, :n] = torch.tensor(list(row.tokens))
            targets[i, :n] = torch.tensor(list(row.targets))
            counted[i, row.scored_from : n] = True
            last[i] = n - 1
        positions = torch.arange(seq_length).expand(len(rows), seq_length)
        batch = dict(tokens=tokens, targets=targets, counted=counted, last=last)
        batch["positions"] = positions
        return {k: v.to(self.device) for k, v in batch.items()}

    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["positions"], None)
        return logits, partial(self._row_scores, batch)

    def _row_scores(self, batch: Dict[str, torch.Tensor], logits: torch.Tensor):
        """(a zero loss, {"scores": [b, 3]}: summed log-probability, all-greedy, next token)."""
        logprob, argmax = vocab_parallel_logprob_and_argmax(
            logits, batch["targets"], self.vocab_size
        )
        counted = batch["counted"]
        summed = torch.where(counted, logprob, torch.zeros_like(logprob)).double().sum(-1)
        greedy = ((argmax == batch["targets"]) | ~counted).all(-1)
        rows = torch.arange(argmax.shape[0], device=argmax.device)
        next_token = argmax[rows, batch["last"]]
        scores = torch.stack([summed.double(), greedy.double(), next_token.double()], dim=-1)
        return torch.zeros((), device=logits.device), {"scores": scores}


class _eval_mode:
    """The chunks in eval mode for the block, then back in the mode each was in."""

    def __init__(self, chunks):
        self.chunks = chunks

    def __enter__(self):
        self.modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()

    def __exit__(self, *exc):
        for chunk, mode in zip(self.chunks, self.modes):
            chunk.train(mode)
