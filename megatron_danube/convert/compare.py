"""Run an HF model directory and a megatron checkpoint on the same prompts; compare logits."""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_danube.errors import DanubeConfigError

MIN_PROMPT_TOKENS = 16
DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to hide.",
    "In Python, a generator function is defined like a normal function, but whenever it needs "
    "to produce a value it uses the yield keyword.",
]


def encode_prompts(tokenizer, prompts: List[str]) -> torch.Tensor:
    """[BOS] + ids of each prompt, cut to the shortest; refuses prompts too short to compare.

    A comparison over one or two tokens agrees almost by accident (a broken tokenizer that
    maps every text to BOS once passed that way), so every prompt must give 16 tokens or more.
    """
    bos = [tokenizer.bos] if tokenizer.bos is not None and tokenizer.bos >= 0 else []
    encoded = [bos + tokenizer.encode(text) for text in prompts]
    for text, ids in zip(prompts, encoded):
        if len(ids) < MIN_PROMPT_TOKENS:
            raise DanubeConfigError(
                f"prompt {text[:40]!r} encodes to {len(ids)} tokens; a comparison needs at "
                f"least {MIN_PROMPT_TOKENS} (use a longer prompt, or check the tokenizer)"
            )
    length = min(len(ids) for ids in encoded)
    return torch.tensor([ids[:length] for ids in encoded])


def megatron_logits(mcore_dir: str, input_ids: torch.Tensor, preset: Optional[str] = None):
    from megatron_danube.convert.checkpoint_io import (
        build_local_model,
        load_megatron_weights,
        model_config_of,
        read_state,
        resolve_checkpoint,
    )
    from megatron_danube.models.full_weights import load_full_weights
    from megatron_danube.models.hf_adapter import local_name

    ckpt = resolve_checkpoint(mcore_dir)
    state = read_state(ckpt)
    model_cfg = model_config_of(state, preset)
    weights = load_megatron_weights(ckpt, model_cfg)
    # checkpoints store norms under TE's names; the local model uses its own
    full = {local_name(k): v.float() for k, v in weights.items()}
    # A LoRA run is compared as it trained: base and adapters, against its merged export.
    model = build_local_model(model_cfg, torch.float32, lora=state.get("lora")).eval()
    load_full_weights([model], full)
    pos = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, pos, None)[..., : model_cfg.vocab_size], model_cfg


def compare(hf_dir: str, mcore_dir: str, input_ids: torch.Tensor, preset: Optional[str] = None):
    from transformers import AutoModelForCausalLM

    ours, _ = megatron_logits(mcore_dir, input_ids, preset)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=input_ids).logits
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    return {
        "max_abs_logit_diff": (ours - ref).abs().max().item(),
        "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "kl_hf_to_megatron": (logp.exp() * (logp - logq)).sum(-1).mean().item(),
        "tokens": int(input_ids.numel()),
    }
