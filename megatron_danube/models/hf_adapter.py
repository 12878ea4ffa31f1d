"""Hugging Face Mistral/Llama <-> megatron-core GPTModel, as one declarative table.

Each row maps a megatron parameter (full, TP=1 shape; the local-spec name, with the TE spelling
as an alias) to the HF tensors it is made of, and how:

* `direct`   one tensor, same layout.
* `vocab`    embedding / output rows: megatron pads to `padded_vocab_size`, HF does not.
* `qkv`      megatron's fused QKV interleaves per KV group: for each of the G groups,
             [q heads of the group; k; v] (each head `head_dim` rows). HF keeps q, k, v apart.
* `gate_up`  megatron's fused SwiGLU fc1 is [gate; up].

RoPE needs no permutation: megatron's non-interleaved rotary is HF's rotate_half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.presets import DanubeModelConfig


@dataclass(frozen=True)
class WeightMapping:
    mcore: str
    hf: Tuple[str, ...]
    kind: str = "direct"
    aliases: Tuple[str, ...] = ()  # the same tensor as the TE spec names it


MAPPINGS: Tuple[WeightMapping, ...] = (
    WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightMapping("output_layer.weight", ("lm_head.weight",), "vocab"),
    WeightMapping(
        "decoder.layers.{i}.input_layernorm.weight",
        ("model.layers.{i}.input_layernorm.weight",),
        aliases=("decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",),
    ),
    WeightMapping(
        "decoder.layers.{i}.self_attention.linear_qkv.weight",
        (
            "model.layers.{i}.self_attn.q_proj.weight",
            "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight",
        ),
        "qkv",
    ),
    WeightMapping(
        "decoder.layers.{i}.self_attention.linear_proj.weight",
        ("model.layers.{i}.self_attn.o_proj.weight",),
    ),
    WeightMapping(
        "decoder.layers.{i}.pre_mlp_layernorm.weight",
        ("model.layers.{i}.post_attention_layernorm.weight",),
        aliases=("decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",),
    ),
    WeightMapping(
        "decoder.layers.{i}.mlp.linear_fc1.weight",
        ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
        "gate_up",
    ),
    WeightMapping(
        "decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",)
    ),
)


def _expand(model: DanubeModelConfig):
    for m in MAPPINGS:
        layers = range(model.num_layers) if "{i}" in m.mcore else [None]
        for i in layers:
            fill = (lambda s, i=i: s.format(i=i)) if i is not None else (lambda s: s)
            yield m, fill(m.mcore), tuple(fill(h) for h in m.hf), tuple(fill(a) for a in m.aliases)


def expected_mcore_shapes(model: DanubeModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Full (TP=1) shape of every megatron tensor, by local-spec name."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv_rows = (model.num_attention_heads + 2 * model.num_query_groups) * d
    per_mapping = {
        "embedding.word_embeddings.weight": (model.padded_vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        "output_layer.weight": (model.padded_vocab_size, h),
        "decoder.layers.{i}.input_layernorm.weight": (h,),
        "decoder.layers.{i}.self_attention.linear_qkv.weight": (qkv_rows, h),
        "decoder.layers.{i}.self_attention.linear_proj.weight": (h, model.num_attention_heads * d),
        "decoder.layers.{i}.pre_mlp_layernorm.weight": (h,),
        "decoder.layers.{i}.mlp.linear_fc1.weight": (2 * f, h),
        "decoder.layers.{i}.mlp.linear_fc2.weight": (h, f),
    }
    out = {}
    for m, name, _, aliases in _expand(model):
        shape = per_mapping[m.mcore]
        for n in (name,) + aliases:
            out[n] = shape
    return out


def check_mcore_shapes(sd: Dict[str, torch.Tensor], model: DanubeModelConfig, where: str) -> None:
    expected = expected_mcore_shapes(model)
    for name, tensor in sd.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise DanubeConfigError(
                f"{where}: {name} has shape {tuple(tensor.shape)} but model {model.name} expects "
                f"{expected[name]}; is this checkpoint of another model (--model-preset)?"
            )


def _fuse_qkv(q, k, v, model: DanubeModelConfig):
    g, d, h = model.num_query_groups, model.head_dim, model.hidden_size
    per_group = model.num_attention_heads // g
    q = q.reshape(g, per_group * d, h)
    k = k.reshape(g, d, h)
    v = v.reshape(g, d, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def _split_qkv(qkv, model: DanubeModelConfig):
    g, d, h = model.num_query_groups, model.head_dim, model.hidden_size
    per_group = model.num_attention_heads // g
    grouped = qkv.reshape(g, (per_group + 2) * d, h)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    pad = torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)
    return torch.cat([t, pad], dim=0)


def _lookup(sd: Dict[str, torch.Tensor], name: str, aliases: Tuple[str, ...], where: str):
    for candidate in (name,) + aliases:
        if candidate in sd:
            return sd.pop(candidate)
    raise DanubeConfigError(f"{where} has no tensor {name!r}; is it a checkpoint of this model?")


def _alias_patterns():
    for m in MAPPINGS:
        for alias in m.aliases:
            pattern = re.escape(alias).replace(re.escape("{i}"), r"(?P<i>\d+)")
            yield re.compile(f"^{pattern}$"), m.mcore


_ALIAS_PATTERNS = tuple(_alias_patterns())


def local_name(name: str) -> str:
    """A parameter's local-spec name, whichever spec named it (TE's fused-norm names map back)."""
    for pattern, mcore in _ALIAS_PATTERNS:
        match = pattern.match(name)
        if match:
            return mcore.format(**match.groupdict())
    return name


def hf_to_mcore(hf: Dict[str, torch.Tensor], model: DanubeModelConfig) -> Dict[str, torch.Tensor]:
    """HF state dict -> full megatron state dict (local-spec names). Consumes `hf`."""
    expected_rows = {
        "q": model.num_attention_heads,
        "k": model.num_query_groups,
        "v": model.num_query_groups,
    }
    for key, tensor in hf.items():
        for proj, heads in expected_rows.items():
            if key.endswith(f"self_attn.{proj}_proj.weight") and tensor.shape != (
                heads * model.head_dim,
                model.hidden_size,
            ):
                raise DanubeConfigError(
                    f"the HF checkpoint's {key} has shape {tuple(tensor.shape)}, but config.json "
                    f"implies {(heads * model.head_dim, model.hidden_size)}"
                )
    out = {}
    for m, name, hf_names, _ in _expand(model):
        tensors = [_lookup(hf, n, (), "the HF checkpoint") for n in hf_names]
        if m.kind == "qkv":
            out[name] = _fuse_qkv(*tensors, model)
        elif m.kind == "gate_up":
            out[name] = torch.cat(tensors, dim=0)
        elif m.kind == "vocab":
            if tensors[0].shape[0] != model.vocab_size:
                raise DanubeConfigError(
                    f"{hf_names[0]} has {tensors[0].shape[0]} rows but vocab_size is "
                    f"{model.vocab_size}"
                )
            out[name] = _pad_rows(tensors[0], model.padded_vocab_size)
        else:
            out[name] = tensors[0]
    check_mcore_shapes(out, model, "the HF checkpoint")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise DanubeConfigError(
            f"the HF checkpoint has tensors this model cannot represent: {leftover[:4]}"
        )
    return out


def iter_mcore_to_hf(sd: Dict[str, torch.Tensor], model: DanubeModelConfig):
    """Yield (HF name, tensor) from a full megatron state dict, consuming it as it goes (so a
    streaming writer holds about one copy of the weights)."""
    for m, name, hf_names, aliases in _expand(model):
        t = _lookup(sd, name, aliases, "the megatron checkpoint")
        if m.kind == "qkv":
            parts = zip(hf_names, _split_qkv(t, model))
        elif m.kind == "gate_up":
            parts = zip(hf_names, t.chunk(2, dim=0))
        elif m.kind == "vocab":
            parts = [(hf_names[0], t[: model.vocab_size])]
        else:
            parts = [(hf_names[0], t)]
        for hf_name, tensor in parts:
            yield hf_name, tensor.contiguous()


def mcore_to_hf(sd: Dict[str, torch.Tensor], model: DanubeModelConfig) -> Dict[str, torch.Tensor]:
    """Full megatron state dict (either spec's names) -> HF state dict. Consumes `sd`."""
    return dict(iter_mcore_to_hf(sd, model))


_STACKED = "decoder.layers."


def unstack_layers(stacked: Dict[str, torch.Tensor], num_layers: int) -> Dict[str, torch.Tensor]:
    """Checkpoint form (one `decoder.layers.X` tensor with a leading layer axis) -> per layer."""
    out = {}
    for key in list(stacked):
        tensor = stacked.pop(key)
        if key.startswith(_STACKED) and not key[len(_STACKED)].isdigit():
            if tensor.shape[0] != num_layers:
                raise DanubeConfigError(
                    f"checkpoint tensor {key} has {tensor.shape[0]} layers, model has {num_layers}"
                )
            rest = key[len(_STACKED) :]
            for i, layer in enumerate(tensor.unbind(0)):
                out[f"{_STACKED}{i}.{rest}"] = layer
        else:
            out[key] = tensor
    return out


def hf_config_dict(model: DanubeModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """A MistralForCausalLM config.json for this model."""
    return {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": model.hidden_size,
        "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.max_position_embeddings,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "sliding_window": model.sliding_window,
        "tie_word_embeddings": False,
        "vocab_size": model.vocab_size,
        "initializer_range": model.init_method_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": torch_dtype,
    }


def model_config_from_hf(cfg: dict, name: str = "from-hf") -> DanubeModelConfig:
    """Read an HF Mistral/Llama config.json; refuse what GPTModel here cannot represent."""
    model_type = cfg.get("model_type")
    if model_type not in ("mistral", "llama"):
        raise DanubeConfigError(
            f"HF model_type {model_type!r} is not supported; expected 'mistral' or 'llama'"
        )
    if cfg.get("tie_word_embeddings", False):
        raise DanubeConfigError("the HF model ties embeddings and lm_head; Danube keeps them apart")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise DanubeConfigError("the HF model has linear biases; Danube models have none")
    if cfg.get("hidden_act", "silu") != "silu":
        raise DanubeConfigError(f"hidden_act {cfg.get('hidden_act')!r} unsupported; need silu")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required + ("vocab_size", "max_position_embeddings") if k not in cfg]
    if missing:
        raise DanubeConfigError(f"the HF config.json lacks {', '.join(missing)}; is it complete?")
    rope_scaling = cfg.get("rope_scaling")
    rope_params = cfg.get("rope_parameters") or {}
    rope_type = (rope_scaling or {}).get("rope_type") or rope_params.get("rope_type")
    if rope_scaling or rope_type not in (None, "default"):
        raise DanubeConfigError(f"rope scaling {rope_scaling or rope_params} is not supported")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"]:
        raise DanubeConfigError(
            f"head_dim {head_dim} x heads {heads} != hidden_size {cfg['hidden_size']}; unsupported"
        )
    theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    window = cfg.get("sliding_window") if model_type == "mistral" else None
    if cfg.get("use_sliding_window") is False:
        window = None
    return DanubeModelConfig(
        name=name,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads", heads),
        ffn_hidden_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"],
        sliding_window=window,
        rope_theta=float(theta),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        init_method_std=cfg.get("initializer_range", 0.02),
    )


def mistral_config(model: DanubeModelConfig, attn_implementation: str = "sdpa"):
    """A transformers `MistralConfig` for this model (HF's own model, for comparisons)."""
    from transformers import MistralConfig

    fields = {
        k: v
        for k, v in hf_config_dict(model, "float32").items()
        if k not in ("architectures", "model_type", "torch_dtype")  # file-level, not arguments
    }
    config = MistralConfig(**fields)
    config._attn_implementation = attn_implementation
    return config
