"""Run configuration: dataclass sections (`sections`) and their YAML loader (`loader`)."""

from megatron_danube.config.loader import check_values, load_config, save_config, to_dict
from megatron_danube.config.sections import (
    ChatSection,
    CheckpointSection,
    DataSection,
    DpoSection,
    LoggingSection,
    ModelSection,
    OptimSection,
    ParallelLayout,
    PeftSection,
    PrecisionConfig,
    RecomputeConfig,
    RunConfig,
    StageSection,
    TrainSection,
)

__all__ = [
    "ChatSection",
    "DpoSection",
    "CheckpointSection",
    "DataSection",
    "LoggingSection",
    "ModelSection",
    "OptimSection",
    "ParallelLayout",
    "PeftSection",
    "PrecisionConfig",
    "RecomputeConfig",
    "RunConfig",
    "StageSection",
    "TrainSection",
    "check_values",
    "load_config",
    "save_config",
    "to_dict",
]
