"""Danube model shapes as named presets in a registry.

A preset is the architecture only (what a checkpoint must agree on). Parallelism, precision and
the layer spec are run settings and are added when the TransformerConfig is made
(`models/config_builder.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_danube.errors import DanubeConfigError


@dataclass(frozen=True)
class DanubeModelConfig:
    """The architecture of a Llama-2/Mistral-style decoder as Danube uses it."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    # Number of keys a query sees, the current token included (HF Mistral's `sliding_window`).
    sliding_window: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_method_std: float = 0.02
    # Vocab rows are padded to a multiple of this, independent of TP, so a checkpoint keeps its
    # shapes when the tensor-parallel size changes.
    vocab_pad_multiple: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return ((self.vocab_size + m - 1) // m) * m

    def num_parameters(self, padded_vocab: bool = False) -> int:
        """Parameter count by arithmetic (untied embeddings, no biases, RMSNorm weights)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        kv = self.num_query_groups * self.head_dim
        attention = h * (h + 2 * kv) + h * h
        mlp = h * 2 * f + f * h
        norms = 2 * h
        vocab = self.padded_vocab_size if padded_vocab else self.vocab_size
        return self.num_layers * (attention + mlp + norms) + 2 * vocab * h + h

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise DanubeConfigError(
                f"model {self.name}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise DanubeConfigError(
                f"model {self.name}: num_attention_heads {self.num_attention_heads} is not "
                f"divisible by num_query_groups {self.num_query_groups}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise DanubeConfigError(
                f"model {self.name}: sliding_window must be >= 1 or null, got {self.sliding_window}"
            )
        if self.head_dim % 2:
            raise DanubeConfigError(
                f"model {self.name}: head_dim {self.head_dim} must be even for RoPE"
            )

    def replace(self, **changes) -> DanubeModelConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise DanubeConfigError(
                f"unknown model field(s) {sorted(unknown)}; known: "
                f"{[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)


_REGISTRY: Dict[str, DanubeModelConfig] = {}


def register_preset(config: DanubeModelConfig) -> DanubeModelConfig:
    config.validate()
    _REGISTRY[config.name] = config
    return config


def get_preset(name: str) -> DanubeModelConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DanubeConfigError(
            f"unknown model preset {name!r}; choose one of {sorted(_REGISTRY)}"
        ) from None


def list_presets() -> Dict[str, DanubeModelConfig]:
    return dict(_REGISTRY)


_DANUBE_SHAPE = dict(
    hidden_size=2560,
    num_layers=24,
    num_attention_heads=32,
    num_query_groups=8,
    ffn_hidden_size=6912,
    vocab_size=32000,
    rope_theta=10000.0,
    norm_eps=1e-5,
)

# H2O-Danube-1.8B: Llama-2 tokenizer, sliding window 4096, context 16384.
register_preset(
    DanubeModelConfig(
        name="danube-1.8b", max_position_embeddings=16384, sliding_window=4096, **_DANUBE_SHAPE
    )
)
# H2O-Danube2-1.8B: same shape, no window, context 8192, Mistral tokenizer.
register_preset(
    DanubeModelConfig(
        name="danube2-1.8b", max_position_embeddings=8192, sliding_window=None, **_DANUBE_SHAPE
    )
)
# The CPU demo: Danube's structure at toy width; the real 32000-piece Mistral vocabulary.
register_preset(
    DanubeModelConfig(
        name="danube-tiny",
        hidden_size=128,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=352,
        vocab_size=32000,
        max_position_embeddings=512,
        sliding_window=64,
    )
)
# Parity tests: GQA, 4 layers (PP=2 x VPP=2), a window far shorter than the test sequences.
register_preset(
    DanubeModelConfig(
        name="danube-test",
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=160,
        vocab_size=250,
        max_position_embeddings=128,
        sliding_window=8,
    )
)
