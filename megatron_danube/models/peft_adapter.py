"""HF PEFT LoRA adapter directories (`adapter_config.json` + `adapter_model.safetensors`) read
as this project's LoRA settings and adapter tensors, so a PEFT adapter can start a run.

Only what maps exactly is accepted: plain LoRA (no DoRA, rsLoRA, bias or saved modules) on the
decoder projections; anything else is a one-line error before a process group exists.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.lora import PROJECTION_LAYER, mcore_lora_name

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_peft_adapter_dir(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str) -> dict:
    """The adapter's config, refused where it is not a LoRA this project trains exactly."""
    where = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(where) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise DanubeConfigError(f"{where}: cannot read it ({type(exc).__name__})") from None
    if not os.path.isfile(os.path.join(path, ADAPTER_WEIGHTS)):
        raise DanubeConfigError(
            f"{path} has no {ADAPTER_WEIGHTS}; save the adapter with safetensors "
            f"(PeftModel.save_pretrained's default)"
        )
    unsupported = [
        (config.get("peft_type", "LORA") != "LORA", f"peft_type {config.get('peft_type')}"),
        (config.get("use_dora"), "use_dora"),
        (config.get("use_rslora"), "use_rslora"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')}"),
        (config.get("modules_to_save"), "modules_to_save"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out"),
        (bool(config.get("rank_pattern")), "rank_pattern"),
        (bool(config.get("alpha_pattern")), "alpha_pattern"),
        (bool(config.get("layers_to_transform")), "layers_to_transform"),
    ]
    found = [what for bad, what in unsupported if bad]
    if found:
        raise DanubeConfigError(
            f"{where}: {', '.join(found)} is not plain LoRA; only plain LoRA adapters on the "
            f"projections start a run"
        )
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise DanubeConfigError(
            f"{where}: target_modules {targets!r} must list projections "
            f"({', '.join(PROJECTION_LAYER)})"
        )
    unknown = [t for t in targets if t not in PROJECTION_LAYER]
    if unknown:
        raise DanubeConfigError(
            f"{where}: target_modules {unknown} are not decoder projections of this model "
            f"({', '.join(PROJECTION_LAYER)})"
        )
    return config


def read_adapter_weights(path: str) -> Dict[str, torch.Tensor]:
    """The adapter's A and B tensors (float32) by this project's megatron names."""
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    out = {}
    for name, tensor in tensors.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            raise DanubeConfigError(
                f"{path}/{ADAPTER_WEIGHTS}: tensor {name} is not a LoRA A or B; only plain LoRA "
                f"adapters start a run"
            )
        out[mcore_lora_name(name)] = tensor.float()
    return out


def adapter_base(path: str, config: dict, given: Optional[str]) -> str:
    """The base model directory the adapter applies to: `given`, else the adapter's own
    `base_model_name_or_path` where that is a local directory."""
    base = given or config.get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        raise DanubeConfigError(
            f"checkpoint.load={path} is a PEFT adapter whose base model {base!r} is not a local "
            f"directory; set peft.base to the base model (an HF directory or a checkpoint)"
        )
    return base
