"""Every layout the project's checks accept for a model on N GPUs, predicted and ranked.

A candidate must pass `runtime.layout.validate_layout` (what `check_layout` refuses) and
`training.stages.plan_stages` (the global batch must split into micro-batches over the
data-parallel ranks), and megatron's interleaved schedule's rule (micro-batches a multiple of
PP); then it must fit in memory. Those that do not are kept with their reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_danube.config.sections import RunConfig, StageSection, TrainSection
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.presets import DanubeModelConfig
from megatron_danube.planning.efficiency import Efficiency
from megatron_danube.planning.layout import RECOMPUTE_CHOICES, PlanLayout
from megatron_danube.planning.memory import Build, MemoryEstimate, estimate_memory
from megatron_danube.planning.speed import Cluster, StepTime, step_time

logger = logging.getLogger(__name__)

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
MAX_VPP = 4


@dataclass(frozen=True)
class Request:
    """What to plan for."""

    model: DanubeModelConfig
    cluster: Cluster
    seq_length: int
    global_batch_tokens: int
    precision: str = "bf16"
    """`bf16` or `fp8` (the linear layers; Transformer Engine)."""
    spec: str = "te"
    train_tokens: int = 10**12


@dataclass
class Plan:
    """One layout with its predictions, or the reason it cannot run."""

    layout: PlanLayout
    memory: Optional[MemoryEstimate] = None
    time: Optional[StepTime] = None
    refused: str = ""

    def as_dict(self, request: Request) -> dict:
        out = {"layout": self.layout.as_dict()}
        if self.memory is not None:
            out["memory_bytes"] = {"total": self.memory.total, **self.memory.parts}
            out["memory_required_bytes"] = self.memory.required()
        if self.time is not None:
            out["tokens_per_s"] = self.time.tokens_per_s
            out["tokens_per_s_per_gpu"] = self.time.tokens_per_s / request.cluster.gpus
            out["mfu"] = self.time.mfu
            out["step_time"] = self.time.as_dict()
            out["days_to_train"] = request.train_tokens / self.time.tokens_per_s / 86400
        if self.refused:
            out["refused"] = self.refused
        return out


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(request: Request):
    """Every TP x PP x VPP x DP x micro-batch x optimizer sharding x recomputation over N."""
    n, model = request.cluster.gpus, request.model
    for tp in _divisors(n):
        if tp > request.cluster.gpus_per_node:
            continue  # TP stays inside a node (its collectives run every layer)
        for pp in _divisors(n // tp):
            vpps = [1] if pp == 1 else [v for v in _divisors(model.num_layers) if v <= MAX_VPP]
            for vpp in vpps:
                for mb in MICRO_BATCHES:
                    for distributed in (True, False):
                        for recompute in RECOMPUTE_CHOICES:
                            dp = n // (tp * pp)
                            yield PlanLayout(tp, pp, vpp, dp, mb, distributed, recompute)


def run_config(request: Request, layout: PlanLayout, base: Optional[RunConfig] = None):
    """`base` (default: the defaults) with this layout, batch and sequence length."""
    import copy

    cfg = copy.deepcopy(base) if base is not None else RunConfig()
    gbt = request.global_batch_tokens
    cfg.parallel = layout.parallel()
    cfg.recompute = layout.recompute_config()
    tokens = -(-request.train_tokens // gbt) * gbt
    cfg.train = TrainSection(
        **{
            **vars(cfg.train),
            "train_tokens": tokens,
            "global_batch_tokens": gbt,
            "micro_batch_size": layout.micro_batch,
        }
    )
    if base is None or all(s.seq_length != request.seq_length for s in cfg.stages):
        cfg.stages = [StageSection(start_tokens=0, seq_length=request.seq_length)]
    cfg.optim.use_distributed_optimizer = layout.distributed_optimizer
    cfg.optim.overlap_grad_reduce = layout.dp > 1
    cfg.precision.params_dtype = "bfloat16"
    cfg.precision.fp8 = "delayed" if request.precision == "fp8" else None
    return cfg


def check(request: Request, layout: PlanLayout) -> str:
    """The project's verdict on this layout: '' or the one-line reason it is refused."""
    from megatron_danube.runtime.layout import validate_layout
    from megatron_danube.training.stages import plan_stages

    try:
        validate_layout(
            layout.parallel(),
            request.model,
            request.cluster.gpus,
            spec=request.spec,
            seq_length=request.seq_length,
        )
        plan_stages(run_config(request, layout), layout.dp)
    except DanubeConfigError as exc:
        return str(exc)
    micro = request.global_batch_tokens // request.seq_length // (layout.micro_batch * layout.dp)
    if layout.vpp > 1 and micro % layout.pp:
        return (
            f"{micro} micro-batches per step: megatron's interleaved schedule needs a multiple "
            f"of pipeline_parallel {layout.pp}"
        )
    return ""


def build_of(request: Request, layout: PlanLayout) -> Build:
    return Build(
        param_bytes=2,
        spec=request.spec,
        fp8=request.precision == "fp8",
        overlap_grad_reduce=layout.dp > 1,
    )


def evaluate(request: Request, layout: PlanLayout, eff: Efficiency) -> Plan:
    """The plan of one layout: refused by the checks, too big, or predicted."""
    reason = check(request, layout)
    if reason:
        return Plan(layout, refused=reason)
    build = build_of(request, layout)
    micro = request.global_batch_tokens // request.seq_length // (layout.micro_batch * layout.dp)
    memory = estimate_memory(request.model, layout, build, request.seq_length, micro)
    capacity = request.cluster.gpu.memory_bytes
    if memory.required() > capacity:
        return Plan(
            layout,
            memory=memory,
            refused=(
                f"does not fit: needs {memory.required() / 2**30:.1f} GiB per GPU "
                f"({memory.total / 2**30:.1f} GiB of tensors on pipeline rank "
                f"{memory.pp_rank}, largest part {max(memory.parts, key=memory.parts.get)}), "
                f"{request.cluster.gpu.name} has {capacity / 2**30:.1f} GiB"
            ),
        )
    time = step_time(
        request.model,
        layout,
        request.cluster,
        seq_length=request.seq_length,
        global_batch_tokens=request.global_batch_tokens,
        precision=request.precision,
        build=build,
        eff=eff,
    )
    return Plan(layout, memory=memory, time=time)


@dataclass
class Search:
    """Every candidate's plan: the runnable ones best first, the refused ones."""

    ranked: List[Plan] = field(default_factory=list)
    refused: List[Plan] = field(default_factory=list)


def search(request: Request, eff: Efficiency) -> Search:
    """Ranked by tokens/s, then by less memory."""
    out = Search()
    for layout in candidate_layouts(request):
        plan = evaluate(request, layout, eff)
        (out.refused if plan.refused else out.ranked).append(plan)
    out.ranked.sort(key=lambda p: (-p.time.tokens_per_s, p.memory.total))
    logger.info(
        "%d layouts predicted, %d refused (checks or memory)", len(out.ranked), len(out.refused)
    )
    return out
