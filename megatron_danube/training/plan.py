"""A run's frozen plan: the config as it runs and every value derived from it, decided once.

`training/preflight.py` makes it before a process group or any data exists; the trainer and
the job read it, and nobody changes the config after `config.yaml` is written from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

from megatron_danube.config import RunConfig


@dataclass(frozen=True)
class StartPoint:
    """Where the weights come from when the run has no checkpoint of its own."""

    checkpoint: Optional[str] = None
    """The checkpoint (or run directory) to load; None: random initialisation."""
    load_optimizer: bool = False
    """Whether its optimizer state is loaded too (fine-tuning starts from weights only)."""
    verify: bool = True
    """Whether its manifest (sizes, CRCs) is checked before loading (`checkpoint.verify`)."""
    convert_from_hf: Optional[str] = None
    """An HF model directory that rank 0 converts into `checkpoint` once, before loading."""
    peft_adapter: Optional[str] = None
    """An HF PEFT adapter directory whose A and B start the LoRA adapters (its base is
    `checkpoint`)."""


@dataclass(frozen=True)
class ChatData:
    """The chat jobs' derived values."""

    seq_length: int
    """Tokens per packed row."""
    sample_length: int
    """The longest sample a row takes (DPO: each side of a pair gets half a row)."""
    packs_per_step: int
    """Rows in a global batch: global_batch_tokens / seq_length."""
    template: str
    """The chat template's resolved Jinja text."""
    files: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    """Checked data files by role: `chat.train`, and `chat.valid` where given."""


@dataclass(frozen=True)
class Plan:
    """Everything a run decided before starting; what `config.yaml` and the log describe."""

    config: RunConfig
    """The config as it runs (job-imposed values resolved); written to `config.yaml`."""
    model: object
    """The model's DanubeModelConfig (preset with `model.overrides`)."""
    layout: tuple
    """check_layout's answer: (launch environment, device type, resolved spec)."""
    data_parallel: int
    """Data-parallel size of the launch."""
    max_seq_length: int
    """The longest sequence the job feeds the model."""
    tokenizer: object
    """The run's tokenizer (checked against the model's vocabulary)."""
    inputs: Mapping[str, str]
    """What the run reads, by content (training/run_inputs.py); recorded in each checkpoint."""
    resumes: bool
    """Whether the run directory holds checkpoints of its own (the run continues from them)."""
    start: StartPoint = StartPoint()
    """The weights a fresh run starts from."""
    stages: tuple = ()
    """Pretraining: the planned stages (training/stages.py)."""
    chat: Optional[ChatData] = None
    """Chat jobs: lengths, packs per step, template and files."""
    lora: Optional[object] = None
    """LoRA's resolved settings (models/lora.py LoraSettings); None: every weight trains."""

    def __post_init__(self):
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))

    @property
    def job(self) -> str:
        return self.config.job

    def summary(self) -> str:
        """The derived values in one line, for the log and `config.yaml`'s header."""
        launch, device, spec = self.layout
        parts = [
            f"job {self.job}",
            f"model {self.model.name}",
            f"{launch.world_size} rank(s), DP {self.data_parallel}",
            f"device {device}, spec {spec}",
            f"max sequence {self.max_seq_length}",
        ]
        if self.chat:
            parts.append(f"{self.chat.packs_per_step} packs/step")
        if self.lora:
            targets = ",".join(p for projs in self.lora.targets.values() for p in projs)
            parts.append(f"LoRA r={self.lora.rank} alpha={self.lora.alpha:g} on {targets}")
        if self.resumes:
            parts.append("resumes its own checkpoints")
        elif self.start.convert_from_hf:
            parts.append(f"starts from HF {self.start.convert_from_hf}")
        elif self.start.checkpoint:
            optimizer = " and optimizer" if self.start.load_optimizer else ""
            parts.append(f"starts from the weights{optimizer} of {self.start.checkpoint}")
        if self.start.peft_adapter and not self.resumes:
            parts.append(f"adapters from PEFT {self.start.peft_adapter}")
        return "; ".join(parts)
