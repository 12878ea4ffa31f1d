"""HF Mistral/Llama directory (safetensors only) -> megatron_danube checkpoint.

Builds the TP=1 local-spec GPTModel, loads the mapped weights and saves a distributed
checkpoint (with its manifest) that the trainer starts from
(`checkpoint.load=DIR checkpoint.load_optimizer=false`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Dict, Optional

import torch

from megatron_danube import compat
from megatron_danube.convert.checkpoint_io import build_local_model
from megatron_danube.convert.hf_export import prepare_output
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.config_builder import DTYPES
from megatron_danube.training import manifest
from megatron_danube.training.checkpoint_format import STATE_FILE
from megatron_danube.training.checkpoint_writer import prepare_results_queue


def read_hf_weights(hf_dir: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    elif any(f.endswith(".bin") for f in os.listdir(hf_dir)):
        raise DanubeConfigError(
            f"{hf_dir} has only pickle (.bin) weights; they can run code when loaded. Re-save "
            f"with safetensors (model.save_pretrained(dir, safe_serialization=True))"
        )
    else:
        raise DanubeConfigError(f"{hf_dir} has no model.safetensors or safetensors index")
    weights = {}
    for name in files:
        path = os.path.join(hf_dir, name)
        try:
            weights.update(load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DanubeConfigError(f"{path} is corrupt or unreadable ({exc})") from None
    return weights


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise DanubeConfigError(f"--load {hf_dir}: no config.json; is it an HF model directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:
        raise DanubeConfigError(f"{path} is not valid JSON ({exc})") from None


def to_mcore(load: str, save: str, dtype: Optional[str] = None) -> str:
    from megatron_danube.models.full_weights import load_full_weights
    from megatron_danube.models.hf_adapter import hf_to_mcore, model_config_from_hf

    if not os.path.isdir(load):
        raise DanubeConfigError(f"--load {load}: no such directory")
    hf_cfg = read_hf_config(load)
    model_cfg = model_config_from_hf(hf_cfg, name=os.path.basename(os.path.normpath(load)))
    model_cfg.validate()
    weights = read_hf_weights(load)
    if dtype is None:  # keep the stored precision
        dtype = {torch.float32: "float32", torch.float16: "float16"}.get(
            next(iter(weights.values())).dtype, "bfloat16"
        )
    if dtype not in DTYPES:
        raise DanubeConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    prepare_output(save)
    full = hf_to_mcore(weights, model_cfg)
    model = build_local_model(model_cfg, DTYPES[dtype])
    load_full_weights([model], full)
    del full, weights
    prepare_results_queue(async_saves=False)
    compat.save_checkpoint(model.sharded_state_dict(), save)
    tokenizer = None
    if any(os.path.isfile(os.path.join(load, f)) for f in ("tokenizer.json", "tokenizer.model")):
        tok_dir = os.path.join(save, "tokenizer")
        os.makedirs(tok_dir)
        for f in os.listdir(load):
            if f.startswith(("tokenizer", "special_tokens_map")):
                shutil.copy(os.path.join(load, f), tok_dir)
        tokenizer = os.path.abspath(tok_dir)
    state = {
        "iteration": 0,
        "consumed_tokens": 0,
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer,
        "tokenizer_type": "huggingface" if tokenizer else None,
        "converted_from": os.path.abspath(load),
        "checkpoint": os.path.basename(os.path.normpath(save)),
        "megatron_core": compat.MCORE_VERSION_STRING,
    }
    with open(os.path.join(save, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    manifest.write_manifest(save, manifest.describe(save, manifest.list_files(save)))
    return save
