"""The run configuration: dataclasses read from YAML, with `section.key=value` overrides.

An unknown key or a value of the wrong type is a one-line DanubeConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.config_builder import PrecisionConfig, RecomputeConfig
from megatron_danube.runtime.layout import ParallelLayout


@dataclass
class ModelSection:
    preset: str = "danube-tiny"
    spec: str = "auto"  # auto | te | local
    overrides: Dict[str, Any] = field(default_factory=dict)  # preset fields to change


@dataclass
class DataSection:
    # Megatron-LM style blend: [w1, prefix1, w2, prefix2, ...] or [prefix]
    blend: List[Any] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer: str = "mistral-v1"
    tokenizer_type: Optional[str] = None
    seed: int = 1234
    # Build the demo corpus (Python's bundled pydoc topics) at this prefix if it is missing.
    demo_corpus_prefix: Optional[str] = None


@dataclass
class StageSection:
    """From `start_tokens` consumed tokens on: this sequence length and (optionally) blend."""

    start_tokens: int = 0
    seq_length: int = 2048
    blend: Optional[List[Any]] = None


@dataclass
class TrainSection:
    train_tokens: int = 1_000_000
    global_batch_tokens: int = 4096
    micro_batch_size: int = 1
    seed: int = 1234
    device: str = "auto"
    max_bad_steps: int = 5  # NaN/Inf losses in a row before the run stops (with a checkpoint)
    exit_after_steps: Optional[int] = None  # stop (with a checkpoint) after this many steps


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine to 10% of peak (Llama-2)
    warmup_tokens: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    initial_loss_scale: float = 2.0**16  # fp16 only


@dataclass
class CheckpointSection:
    save_interval: Optional[int] = None  # steps; None: only at the end and on signals
    keep_last: int = 3
    async_save: bool = False
    load: Optional[str] = None  # a checkpoint dir to start from (else the run dir's latest)
    load_optimizer: bool = True  # False: weights only (e.g. continuing from converted HF weights)


@dataclass
class LoggingSection:
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    tensorboard: bool = True
    peak_tflops: Optional[float] = None  # None: 989 (H100 bf16 dense) on GPU, unset on CPU


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    data: DataSection = field(default_factory=DataSection)
    stages: List[StageSection] = field(default_factory=lambda: [StageSection()])
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DanubeConfigError:
                pass
        raise DanubeConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, list):
            raise DanubeConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise DanubeConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DanubeConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise DanubeConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DanubeConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DanubeConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DanubeConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise DanubeConfigError(f"unknown config key {full!r}; known keys: {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if part.isdigit() and isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, (dict, list)):
            raise DanubeConfigError(f"override {dotted}: {part} is not a section")
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: Optional[str], overrides: List[str] = ()) -> RunConfig:
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except OSError as exc:
            raise DanubeConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise DanubeConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}")
    # Start from the defaults so overrides of untouched sections work.
    base = to_dict(RunConfig())
    _deep_update(base, tree, "")
    for item in overrides:
        if "=" not in item:
            raise DanubeConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(base, key.strip(), yaml.safe_load(raw) if raw != "" else None)
    return from_dict(RunConfig, base)


def _deep_update(base: dict, new: dict, prefix: str) -> None:
    if not isinstance(new, dict):
        raise DanubeConfigError(f"{prefix or 'config'}: expected a mapping, got {new!r}")
    for key, value in new.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in base:
            raise DanubeConfigError(f"unknown config key {full!r}; known keys: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "overrides":
            _deep_update(base[key], value, full)
        else:
            base[key] = value


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
