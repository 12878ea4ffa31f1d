"""Run an HF model directory and a megatron checkpoint on the same prompts; compare logits."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from megatron_danube.errors import DanubeConfigError

DEFAULT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In Python, a generator function is defined like a normal function, but",
]


def megatron_logits(mcore_dir: str, input_ids: torch.Tensor, preset: Optional[str] = None):
    from megatron_danube.convert import (
        build_local_model,
        load_megatron_weights,
        model_config_of,
        read_state,
        resolve_checkpoint,
    )
    from megatron_danube.models.full_weights import load_full_weights
    from megatron_danube.models.hf_adapter import to_local_names

    ckpt = resolve_checkpoint(mcore_dir)
    model_cfg = model_config_of(read_state(ckpt), preset)
    weights = load_megatron_weights(ckpt, model_cfg)
    # checkpoints store norms under TE's names; the local model uses its own
    full = to_local_names({k: v.float() for k, v in weights.items()}, model_cfg)
    model = build_local_model(model_cfg, torch.float32).eval()
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="compare_hf_megatron.py", description=__doc__)
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--mcore", required=True, help="megatron_danube run or checkpoint directory")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the HF directory's)")
    p.add_argument("--model-preset", default=None)
    args = p.parse_args(argv)
    try:
        from megatron_danube.data.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer or args.hf)
        prompts: List[str] = args.prompt or DEFAULT_PROMPTS
        encoded = [([tok.bos] if tok.bos is not None and tok.bos >= 0 else []) + tok.encode(t)
                   for t in prompts]
        length = min(len(e) for e in encoded)
        ids = torch.tensor([e[:length] for e in encoded])
        result = compare(args.hf, args.mcore, ids, args.model_preset)
    except DanubeConfigError as exc:
        print(f"compare_hf_megatron.py: error: {exc}", file=sys.stderr)
        return 2
    for key, value in result.items():
        print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return 0
