"""megatron_danube checkpoint -> HF `MistralForCausalLM` directory.

Maps the full tensors through `models/hf_adapter.py`'s table and streams them into sharded
safetensors (about one copy of the weights in memory), then writes config.json,
generation_config.json and the run's tokenizer as an HF tokenizer that encodes exactly as the
training tokenizer did.
"""

from __future__ import annotations

import json
import logging
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

logger = logging.getLogger(__name__)


def run_tokenizer(spec: Optional[str], tokenizer_type: Optional[str]):
    """The tokenizer the run trained with, or None where the checkpoint records none.

    One the checkpoint names but this machine cannot load is an error, found before any
    weight is read: an export without its tokenizer, or with another one, would encode text
    differently from training.
    """
    if not spec:
        logger.warning("the checkpoint records no tokenizer; the export has none (--tokenizer)")
        return None
    from megatron_danube.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec, tokenizer_type)
    except DanubeConfigError as exc:
        raise DanubeConfigError(
            f"the run's tokenizer {spec!r} cannot be loaded here ({exc}); install it or pass "
            f"--tokenizer PATH"
        ) from None


def to_hf(
    load: str,
    save: str,
    dtype: str = "bfloat16",
    preset: Optional[str] = None,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer: Optional[str] = None,
    chat_template: Optional[str] = None,
    merge_lora: bool = False,
    peft: bool = False,
    lora_base: Optional[str] = None,
) -> str:
    """Write the HF directory; `chat_template` (a name, file or text) defaults to the one a
    fine-tuning run recorded, so chat models export ready for `apply_chat_template`. A LoRA
    run's adapters are merged into the weights (`merge_lora`, the base read from the checkpoint
    the run recorded, or `lora_base`) or written alone as a PEFT adapter (`peft`)."""
    import safetensors.torch  # noqa: F401  (the [hf] extra: missing, it is named before any work)

    from megatron_danube.convert import lora_export
    from megatron_danube.models.hf_adapter import hf_config_dict, iter_mcore_to_hf

    if dtype not in DTYPES:
        raise DanubeConfigError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    if os.path.isfile(os.path.join(load, "config.json")) and not os.path.exists(
        os.path.join(load, "train_state.json")
    ):
        raise DanubeConfigError(
            f"--load {load} is a Hugging Face model directory (config.json); did you mean "
            f"--to mcore?"
        )
    ckpt = resolve_checkpoint(load)
    state = read_state(ckpt)
    lora = lora_export.lora_of(state, ckpt, merge=merge_lora, peft=peft)
    model_cfg = model_config_of(state, preset)
    if tokenizer is not None:
        tok = run_tokenizer(tokenizer, None)
    else:
        tok = run_tokenizer(state.get("tokenizer"), state.get("tokenizer_type"))
    if tok is not None and tok.vocab_size > model_cfg.vocab_size:
        raise DanubeConfigError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model {model_cfg.vocab_size}"
        )
    if chat_template is not None:
        from megatron_danube.data.chat.template import resolve_template

        chat_template = resolve_template(chat_template)
    else:
        chat_template = state.get("chat_template")
    if chat_template is not None and tok is None:
        raise DanubeConfigError("a chat template needs a tokenizer; pass --tokenizer PATH")
    if chat_template is not None:
        from megatron_danube.data.chat.encoder import chat_backend
        from megatron_danube.data.chat.template import ChatTemplate

        ChatTemplate(chat_template, chat_backend(tok)[1]).check()  # before anything is written
    prepare_output(save)
    weights = load_megatron_weights(ckpt, model_cfg, lora_base=lora_base, with_base=not peft)
    target = DTYPES[dtype]
    adapters = lora_export.split_adapters(weights)
    if adapters and lora is None:
        raise DanubeConfigError(f"{ckpt} holds LoRA adapters but no record of their settings")
    if peft:
        base = state.get("lora", {}).get("base") or ""
        lora_export.write_peft_adapter(adapters, lora, save, base, target)
        if tok is not None:
            _save_tokenizer(tok, save, chat_template, model_cfg)
        return save
    tensors = iter_mcore_to_hf(weights, model_cfg)
    if adapters:
        tensors = lora_export.merged(tensors, adapters, lora)

    _write_shards(tensors, save, target, max_shard_bytes)
    leftover = [k for k in weights if not k.endswith("_extra_state")]
    if leftover:
        raise DanubeConfigError(f"checkpoint tensors with no HF counterpart: {leftover[:4]}")
    with open(os.path.join(save, "config.json"), "w") as f:
        json.dump(hf_config_dict(model_cfg, dtype), f, indent=1)
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    if tok is not None:
        _save_tokenizer(tok, save, chat_template, model_cfg)
        gen.update(bos_token_id=tok.bos, eos_token_id=tok.eod)
    with open(os.path.join(save, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=1)
    return save


def _write_shards(tensors, save: str, target, max_shard_bytes: int) -> None:
    """Stream (name, tensor) into safetensors shards of at most `max_shard_bytes`, named as
    HF names them (with an index when there is more than one)."""
    from safetensors.torch import save_file

    shard, shard_bytes, shards, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(shards):05d}.safetensors.tmp"
            save_file(shard, os.path.join(save, name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        tensor = tensor.to(target).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total += size
    flush()
    n = len(shards)
    for i, (tmp_name, names) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(save, tmp_name), os.path.join(save, final))
        weight_map.update({k: final for k in names})
    if n > 1:
        with open(os.path.join(save, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def _save_tokenizer(tok, save: str, chat_template, model_cfg) -> None:
    from megatron_danube.data.hf_tokenizer import save_hf_tokenizer

    save_hf_tokenizer(
        tok, save, chat_template=chat_template, model_max_length=model_cfg.max_position_embeddings
    )


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
