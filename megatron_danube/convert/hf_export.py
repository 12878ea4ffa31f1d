"""megatron_danube checkpoint -> HF `MistralForCausalLM` directory.

Maps the full tensors through `models/hf_adapter.py`'s table and streams them into sharded
safetensors (about one copy of the weights in memory), then writes config.json,
generation_config.json and the run's tokenizer as an HF tokenizer that encodes exactly as the
training tokenizer did.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron_danube.convert.checkpoint_io import (
    load_megatron_weights,
    model_config_of,
    read_state,
    resolve_checkpoint,
)
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.config_builder import DTYPES


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

        LlamaTokenizer(
            vocab_file=tok.path, legacy=True, add_bos_token=True, add_eos_token=False
        ).save_pretrained(out_dir)
    return True


def to_hf(
    load: str,
    save: str,
    dtype: str = "bfloat16",
    preset: Optional[str] = None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    from safetensors.torch import save_file

    from megatron_danube.models.hf_adapter import hf_config_dict, iter_mcore_to_hf

    if dtype not in DTYPES:
        raise DanubeConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    ckpt = resolve_checkpoint(load)
    state = read_state(ckpt)
    model_cfg = model_config_of(state, preset)
    prepare_output(save)
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


def prepare_output(save: str) -> None:
    """An empty, writable output directory, or a one-line error; nothing is ever replaced."""
    if os.path.exists(save) and not os.path.isdir(save):
        raise DanubeConfigError(f"--save {save} is a file; choose a new directory")
    if os.path.isdir(save) and os.listdir(save):
        raise DanubeConfigError(f"--save {save} exists and is not empty; choose a new directory")
    try:
        os.makedirs(save, exist_ok=True)
    except OSError as exc:
        raise DanubeConfigError(f"--save {save}: cannot create it ({exc.strerror})") from None
    if not os.access(save, os.W_OK):
        raise DanubeConfigError(f"--save {save} is not writable; choose another directory")


def remove_failed_output(save: str) -> None:
    """Only ever called on a directory this run created empty and half filled."""
    if os.path.isdir(save):
        shutil.rmtree(save, ignore_errors=True)
