"""A LoRA run's adapters out to Hugging Face: merged into the weights, or as a PEFT adapter.

The adapters are stored one per HF projection (models/lora.py), so both ways are exact: merging
adds `scaling * B @ A` to that projection's HF weight; the PEFT adapter is the same A and B under
PEFT's names, with an `adapter_config.json` that `peft.PeftModel.from_pretrained` reads.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, Tuple

import torch

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.lora import hf_peft_name, is_adapter_name
from megatron_danube.models.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def split_adapters(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Take the adapter tensors out of a full megatron state dict; returns them."""
    return {k: weights.pop(k) for k in [k for k in weights if is_adapter_name(k)]}


def _hf_weight_name(peft_name: str) -> str:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ->
    `model.layers.3.self_attn.q_proj.weight`."""
    module = peft_name.removeprefix("base_model.model.").rsplit(".", 2)[0]
    return f"{module}.weight"


def merged(
    hf_tensors: Iterator[Tuple[str, torch.Tensor]], adapters: Dict[str, torch.Tensor], lora: dict
) -> Iterator[Tuple[str, torch.Tensor]]:
    """The HF tensors with each adapted projection's `scaling * B @ A` added (in fp32)."""
    scaling = lora["alpha"] / lora["rank"]
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for name, tensor in adapters.items():
        peft = hf_peft_name(name)
        pairs.setdefault(_hf_weight_name(peft), {})[peft.rsplit(".", 2)[1]] = tensor
    for name, tensor in hf_tensors:
        pair = pairs.pop(name, None)
        if pair is not None:
            delta = pair["lora_B"].float() @ pair["lora_A"].float()
            tensor = (tensor.float() + scaling * delta).to(tensor.dtype)
        yield name, tensor
    if pairs:
        raise DanubeConfigError(f"adapters of no HF weight: {sorted(pairs)[:3]}")


def write_peft_adapter(
    adapters: Dict[str, torch.Tensor], lora: dict, save: str, base: str, dtype: torch.dtype
) -> None:
    """`adapter_config.json` and `adapter_model.safetensors` as HF PEFT writes them."""
    from safetensors.torch import save_file

    tensors = {hf_peft_name(k): v.to(dtype).contiguous() for k, v in adapters.items()}
    targets = sorted({k.rsplit(".", 3)[1] for k in tensors})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    save_file(tensors, os.path.join(save, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(save, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=1)


def lora_of(state: dict, ckpt: str, *, merge: bool, peft: bool):
    """The run's LoRA settings (None: a full model), checked against what the export asks."""
    lora = state.get("lora")
    if peft and lora is None:
        raise DanubeConfigError(
            f"{ckpt} holds no LoRA adapters (not a peft.method=lora run); use --to hf"
        )
    if lora is not None and not (merge or peft):
        raise DanubeConfigError(
            f"{ckpt} holds LoRA adapters; add --merge-lora for one model with them merged, or "
            f"write the adapter alone with --to hf-peft"
        )
    return lora
