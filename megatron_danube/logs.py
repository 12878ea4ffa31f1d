"""Logging for every entry point: progress from rank 0 only, warnings from every rank.

Progress goes to stdout (it is the run's log); each record carries the time and, where there
are several ranks, the rank that wrote it. Warnings are filtered by message and module, never
wholesale: the ones silenced here are known, harmless and repeated by every process.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (message regex, module regex) of warnings that say nothing actionable about this package.
KNOWN_WARNINGS = (
    # megatron-core on a machine without TE/apex: its fallbacks are what the CPU path uses.
    (r".*Transformer Engine and Apex are not installed.*", r"megatron\..*"),
    (r".*Apex is not installed.*", r"megatron\..*"),
    # torch's weights-only unpickling note, printed for every megatron checkpoint load.
    (r".*torch.load.*weights_only.*", r""),
    # megatron's optimizer probes `.grad` on main params while building its groups.
    (r".*\.grad attribute of a Tensor that is not a leaf.*", r"megatron\.core\.optimizer.*"),
    # megatron's TransformerConfig defaults trip its own deprecation note on every build.
    (r".*full scope is deprecated.*", r"megatron\.core\.transformer.*"),
    # megatron 0.16 reads checkpoints through torch's old (still working) entry point.
    (r".*`load_state_dict` is deprecated.*", r"megatron\.core\.dist_checkpointing.*"),
    # megatron 0.16 calls the collectives torch renamed; the old names still work.
    (
        r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*deprecated.*",
        r"torch\.distributed\..*",
    ),
    # torch's checkpoint planner on every load of megatron's ShardedTensor-based checkpoints.
    (r".*deprecating ShardedTensor.*", r"torch\.distributed\.checkpoint.*"),
    # megatron 0.17+ announces an unused multimodal config class when its package is imported.
    (r".*MimoModelConfig is experimental.*", r"megatron\..*"),
    # megatron 0.19 calls torch's checkpoint reader positionally, and in one process for
    # metadata; torch notes both on every load.
    (r".*The argument order of load has been changed.*", r"torch\.distributed\.checkpoint.*"),
    (r".*assuming the intent is to load in a single process.*", r"torch\.distributed\..*"),
)

# (logger regex, message regex) of megatron-core's own log records that say nothing actionable.
KNOWN_RECORDS = (
    # 0.19 points GPTModel users at HybridModel; GPTModel keeps working and gets bug fixes.
    (r"megatron\.core\.models\.gpt\..*", r"GPTModel IS DEPRECATED"),
    # 0.18+ rewraps a layer spec's MLP given the 0.16 way; the layer it builds is the same.
    (r"megatron\.core\.transformer\..*", r"Rewrapping ModuleSpec with module"),
    # 0.18+ DDP computes the distributed optimizer's buffer layout itself when not given one.
    (r"megatron\.core\.distributed\..*", r"full_param_layout not provided"),
    # 0.17+ prefers nvidia-resiliency-ext's writer; megatron's own is chosen on purpose
    # (compat.py): it needs no extra package.
    (r"megatron\.core\.dist_checkpointing\..*", r"MCore's async save is deprecated"),
    # 0.19 reads the common.pt that saves add for 0.16 to 0.18 (compat.py) and says
    # that file is deprecated: it holds the same data as the shards.
    (r"megatron\.core\.dist_checkpointing\..*", r"load_common is deprecated"),
)


def process_rank() -> int:
    """This process's rank from torch.distributed, else from the launcher's variables."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class KnownRecordFilter(logging.Filter):
    """Drops the log records listed in KNOWN_RECORDS, by logger and message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(
            re.match(name, record.name) and re.search(message, record.getMessage())
            for name, message in KNOWN_RECORDS
        )


class RankFilter(logging.Filter):
    """INFO and below from rank 0 only; every record labelled with its rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = process_rank()
        record.rank = rank
        return rank == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once per process (idempotent)."""
    root = logging.getLogger()
    if any(isinstance(f, RankFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(RankFilter())
    handler.addFilter(KnownRecordFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(level)
    # megatron-core's INFO lines (its DDP and optimizer settings dumps) drown the run's log.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    logging.captureWarnings(True)
