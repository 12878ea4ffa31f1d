"""Checkpoint conversion between megatron_danube distributed checkpoints and HF Mistral.

--to hf     reads the checkpoint's metadata and loads every model tensor at full size in one
            CPU process (whatever TP/PP/DP or spec wrote it: stored keys are global and
            spec-independent), maps them through `models/hf_adapter.py`'s table and streams
            them into sharded safetensors (about one copy of the weights in memory).
--to mcore  reads safetensors only (no pickle), builds the TP=1 local-spec GPTModel, loads the
            mapped weights and saves a distributed checkpoint the trainer starts from
            (`checkpoint.load=DIR checkpoint.load_optimizer=false`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from typing import Dict, Optional

import torch

from megatron_danube.errors import DanubeConfigError
from megatron_danube.training.checkpointing import STATE_FILE

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


# ------------------------------------------------------------------------- process group


def _init_single_rank(model_cfg) -> None:
    """One gloo rank in this process (dist_checkpointing needs a process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_danube.runtime.distributed import initialize
    from megatron_danube.config import ParallelLayout

    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
    ):
        return
    saved = dict(os.environ)
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS",
                    "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(var, None)  # a single process: a free local port is picked
    try:
        initialize(model_cfg, ParallelLayout(), spec="local", device="cpu")
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ------------------------------------------------------------------------- megatron side


def resolve_checkpoint(path: str) -> str:
    """A run dir, its checkpoints/ dir, or an iter_* dir -> the iter dir to read."""
    if not os.path.isdir(path):
        raise DanubeConfigError(f"--load {path}: no such directory")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for base in (path, os.path.join(path, "checkpoints")):
        pointer = os.path.join(base, "latest")
        if os.path.isfile(pointer):
            with open(pointer) as f:
                candidate = os.path.join(base, f.read().strip())
            if os.path.isfile(os.path.join(candidate, STATE_FILE)):
                return candidate
            raise DanubeConfigError(f"{pointer} names an incomplete checkpoint {candidate}")
    raise DanubeConfigError(
        f"--load {path}: not a megatron_danube checkpoint (no {STATE_FILE}, no latest pointer)"
    )


def read_state(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise DanubeConfigError(f"{ckpt}/{STATE_FILE} is unreadable: {exc}") from None


def model_config_of(state: dict, preset: Optional[str] = None):
    from megatron_danube.models.presets import DanubeModelConfig, get_preset

    if preset:
        return get_preset(preset)
    if "model" not in state:
        raise DanubeConfigError("the checkpoint does not record its model; pass --model-preset NAME")
    return DanubeModelConfig(**state["model"])


def load_megatron_weights(ckpt: str, model_cfg) -> Dict[str, torch.Tensor]:
    """Every model tensor of a distributed checkpoint at full size, per-layer names."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_danube.models.hf_adapter import unstack_layers

    _init_single_rank(model_cfg)
    try:
        metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    except Exception as exc:
        raise DanubeConfigError(f"{ckpt}: cannot read checkpoint metadata ({type(exc).__name__})")
    request = {}
    for key, meta in metadata.items():
        model_key = key[len("module."):] if key.startswith("module.") else key
        if not model_key.startswith(MODEL_PREFIXES) or not isinstance(meta, ShardedTensor):
            continue  # optimizer state, RNG, TE extra state
        tensor = torch.empty(meta.global_shape, dtype=meta.dtype)
        request[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
    if not request:
        raise DanubeConfigError(f"{ckpt}: the checkpoint holds no model tensors")
    try:
        loaded = dist_checkpointing.load(request, ckpt)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise DanubeConfigError(
            f"{ckpt}: checkpoint data is corrupt or incomplete ({type(exc).__name__})"
        ) from None
    # `load` also returns the checkpoint's common (non-sharded) state: keep the tensors asked for.
    weights = {
        k[len("module."):] if k.startswith("module.") else k: v
        for k, v in loaded.items()
        if k in request
    }
    from megatron_danube.models.hf_adapter import check_mcore_shapes

    weights = unstack_layers(weights, model_cfg.num_layers)
    check_mcore_shapes(weights, model_cfg, ckpt)
    return weights


def export_tokenizer(spec: Optional[str], tokenizer_type: Optional[str], out_dir: str) -> bool:
    if not spec:
        return False
    from megatron_danube.data.tokenizer import load_tokenizer, resolve_tokenizer_path

    try:
        tok = load_tokenizer(spec, tokenizer_type)
    except DanubeConfigError as exc:
        print(f"convert: tokenizer {spec!r} not exported: {exc}", file=sys.stderr)
        return False
    path = resolve_tokenizer_path(spec)
    if tok.kind == "huggingface":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(path, local_files_only=True).save_pretrained(out_dir)
    else:
        from transformers import LlamaTokenizer

        LlamaTokenizer(vocab_file=tok.path, legacy=True, add_bos_token=True,
                       add_eos_token=False).save_pretrained(out_dir)
    return True


def to_hf(load: str, save: str, dtype: str = "bfloat16", preset: Optional[str] = None,
          max_shard_bytes: int = 5 * 2**30) -> str:
    from safetensors.torch import save_file

    from megatron_danube.models.hf_adapter import hf_config_dict, iter_mcore_to_hf

    if dtype not in DTYPES:
        raise DanubeConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    ckpt = resolve_checkpoint(load)
    state = read_state(ckpt)
    model_cfg = model_config_of(state, preset)
    _prepare_output(save)
    weights = load_megatron_weights(ckpt, model_cfg)
    target = DTYPES[dtype]

    shard, shard_bytes, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(shards):05d}.safetensors.tmp"
            save_file(shard, os.path.join(save, name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in iter_mcore_to_hf(weights, model_cfg):
        tensor = tensor.to(target).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    leftover = [k for k in weights if not k.endswith("_extra_state")]
    if leftover:
        raise DanubeConfigError(f"checkpoint tensors with no HF counterpart: {leftover[:4]}")
    n = len(shards)
    for i, (tmp_name, names) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(save, tmp_name), os.path.join(save, final))
        weight_map.update({k: final for k in names})
    if n > 1:
        with open(os.path.join(save, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(hf_config_dict(model_cfg, dtype), f, indent=1)
    have_tok = export_tokenizer(state.get("tokenizer"), state.get("tokenizer_type"), save)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    if have_tok:
        from megatron_danube.data.tokenizer import load_tokenizer

        tok = load_tokenizer(state["tokenizer"], state.get("tokenizer_type"))
        gen.update(bos_token_id=tok.bos, eos_token_id=tok.eod)
    with open(os.path.join(save, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=1)
    return save


def _prepare_output(save: str) -> None:
    if os.path.exists(save) and os.listdir(save):
        raise DanubeConfigError(f"--save {save} exists and is not empty; choose a new directory")
    os.makedirs(save, exist_ok=True)


def _remove_failed_output(save: str) -> None:
    """Only ever called on a directory this run created empty and half filled."""
    if os.path.isdir(save):
        shutil.rmtree(save, ignore_errors=True)


# ------------------------------------------------------------------------- HF side


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


def build_local_model(model_cfg, dtype: torch.dtype):
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.config import PrecisionConfig
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.config import ParallelLayout

    _init_single_rank(model_cfg)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    config = build_transformer_config(
        model_cfg, ParallelLayout(), spec="local", device_type="cpu",
        precision=PrecisionConfig(params_dtype=name), perform_initialization=False,
    )
    return build_model_chunks(model_cfg, config, "local", torch.device("cpu"))[0]


def to_mcore(load: str, save: str, dtype: Optional[str] = None) -> str:
    from megatron.core import dist_checkpointing

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
            next(iter(weights.values())).dtype, "bfloat16")
    if dtype not in DTYPES:
        raise DanubeConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    _prepare_output(save)
    full = hf_to_mcore(weights, model_cfg)
    model = build_local_model(model_cfg, DTYPES[dtype])
    load_full_weights([model], full)
    del full, weights
    dist_checkpointing.save(model.sharded_state_dict(), save)
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
    }
    with open(os.path.join(save, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    return save


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="convert_checkpoint.py", description=__doc__.splitlines()[0])
    p.add_argument("--to", required=True, choices=["hf", "mcore"])
    p.add_argument("--load", required=True, help="megatron run/checkpoint dir, or HF model dir")
    p.add_argument("--save", required=True, help="output directory (new or empty)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="--to hf: default bfloat16; --to mcore: default the HF weights' dtype")
    p.add_argument("--model-preset", default=None,
                   help="--to hf: the model preset, for checkpoints that do not record it")
    args = p.parse_args(argv)
    existed = os.path.exists(args.save) and bool(os.listdir(args.save))
    try:
        if args.to == "hf":
            out = to_hf(args.load, args.save, args.dtype or "bfloat16", args.model_preset)
        else:
            out = to_mcore(args.load, args.save, args.dtype)
    except BaseException as exc:
        if not existed:  # never leave a half-written output that looks like a model
            _remove_failed_output(args.save)
        if isinstance(exc, DanubeConfigError):
            print(f"convert_checkpoint.py: error: {exc}", file=sys.stderr)
            return 2
        raise
    print(f"wrote {out}")
    return 0
