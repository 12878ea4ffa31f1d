"""One candidate layout of a run, in the project's own config terms."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from megatron_danube.config.sections import ParallelLayout, RecomputeConfig

RECOMPUTE_CHOICES = (None, "selective", "full")  # recompute.granularity's values


@dataclass(frozen=True)
class PlanLayout:
    """TP x PP (x VPP) x DP, the micro-batch, the optimizer sharding and recomputation.

    Sequence parallelism is on whenever TP > 1 (it only removes memory and traffic)."""

    tp: int
    pp: int
    vpp: int
    dp: int
    micro_batch: int
    distributed_optimizer: bool
    recompute: Optional[str]
    """`recompute.granularity`: None, `selective` or `full` (uniform, one layer a group)."""

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    def parallel(self) -> ParallelLayout:
        """The `parallel:` section of this layout."""
        return ParallelLayout(
            tensor_parallel=self.tp,
            pipeline_parallel=self.pp,
            virtual_pipeline=self.vpp,
            sequence_parallel=self.sequence_parallel,
        )

    def recompute_config(self) -> RecomputeConfig:
        """The `recompute:` section of this layout."""
        return RecomputeConfig(granularity=self.recompute)

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        vpp = f"x{self.vpp}" if self.vpp > 1 else ""
        return f"TP{self.tp} PP{self.pp}{vpp} DP{self.dp}"
