"""The Danube stage schedule: sequence length and blend change at consumed-token boundaries.

The global batch is set in tokens and stays constant: when the sequence length doubles, the
number of sequences per step halves (and so does the number of micro-batches). Where a run is
inside a stage is a function of consumed tokens alone, so resuming anywhere is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from megatron_danube.errors import DanubeConfigError


@dataclass(frozen=True)
class Stage:
    index: int
    start_tokens: int
    end_tokens: int
    seq_length: int
    blend: tuple
    global_batch_seqs: int
    num_microbatches: int

    def sample_index(self, consumed_tokens: int) -> int:
        """Index of the next sample of this stage's dataset to read."""
        return (consumed_tokens - self.start_tokens) // self.seq_length

    @property
    def num_samples(self) -> int:
        return (self.end_tokens - self.start_tokens) // self.seq_length


def check_stage_lengths(cfg, model) -> None:
    """Every stage's sequence fits the model's context (checked before the layout, which
    would otherwise report the longest stage without naming it)."""
    for i, stage in enumerate(cfg.stages):
        if stage.seq_length > model.max_position_embeddings:
            raise DanubeConfigError(
                f"stages[{i}].seq_length {stage.seq_length} exceeds model {model.name}'s "
                f"context {model.max_position_embeddings}; shorten the stage or choose a "
                f"longer-context preset"
            )


def plan_stages(cfg, data_parallel: int) -> List[Stage]:
    train, stages = cfg.train, cfg.stages
    gbt, mbs = train.global_batch_tokens, train.micro_batch_size
    if not stages:
        raise DanubeConfigError("stages is empty; give at least one stage with start_tokens: 0")
    if stages[0].start_tokens != 0:
        raise DanubeConfigError(f"stages[0].start_tokens is {stages[0].start_tokens}; it must be 0")
    if gbt <= 0 or mbs <= 0:
        raise DanubeConfigError("train.global_batch_tokens and train.micro_batch_size must be > 0")
    if train.train_tokens % gbt:
        raise DanubeConfigError(
            f"train.train_tokens {train.train_tokens} is not a multiple of "
            f"train.global_batch_tokens {gbt}"
        )
    planned = []
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if i and stage.start_tokens <= stages[i - 1].start_tokens:
            raise DanubeConfigError(f"{where}.start_tokens must increase; got {stage.start_tokens}")
        if stage.start_tokens % gbt:
            raise DanubeConfigError(
                f"{where}.start_tokens {stage.start_tokens} is not a multiple of "
                f"train.global_batch_tokens {gbt}; stages change only between steps"
            )
        if gbt % stage.seq_length:
            raise DanubeConfigError(
                f"train.global_batch_tokens {gbt} is not a multiple of {where}.seq_length "
                f"{stage.seq_length}"
            )
        seqs = gbt // stage.seq_length
        if seqs % (mbs * data_parallel):
            raise DanubeConfigError(
                f"{where}: {seqs} sequences per step do not split into micro-batches of "
                f"{mbs} over {data_parallel} data-parallel ranks; change global_batch_tokens, "
                f"micro_batch_size or the layout"
            )
        end = stages[i + 1].start_tokens if i + 1 < len(stages) else train.train_tokens
        blend = stage.blend if stage.blend is not None else cfg.data.blend
        planned.append(
            Stage(
                index=i,
                start_tokens=stage.start_tokens,
                end_tokens=min(end, train.train_tokens),
                seq_length=stage.seq_length,
                blend=tuple(blend),
                global_batch_seqs=seqs,
                num_microbatches=seqs // (mbs * data_parallel),
            )
        )
    return [s for s in planned if s.start_tokens < train.train_tokens] or planned[:1]


def stage_at(stages: List[Stage], consumed_tokens: int) -> Stage:
    current = stages[0]
    for stage in stages:
        if consumed_tokens >= stage.start_tokens:
            current = stage
    return current
