"""Which transformer-layer implementation a run uses: Transformer Engine or local PyTorch.

Both specs produce the same parameter names in distributed checkpoints: the local spec keeps
megatron's `sharded_state_dict_keys_map`, which files the separate norms under the names TE's
fused LayerNormLinear uses (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

import importlib.util

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.local_layers import DanubeRMSNorm, SDPAttention

SPEC_CHOICES = ("auto", "te", "local")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_spec(requested: str, device_type: str) -> str:
    """'auto' picks TE when it imports and the run is on GPU, else local."""
    if requested not in SPEC_CHOICES:
        raise DanubeConfigError(f"model.spec={requested!r}; choose one of {SPEC_CHOICES}")
    if requested == "local":
        return "local"
    have_te = transformer_engine_available()
    if requested == "te":
        if not have_te:
            raise DanubeConfigError(
                "model.spec=te but transformer_engine is not installed; "
                'pip install -e ".[te]" or set model.spec=local'
            )
        if device_type != "cuda":
            raise DanubeConfigError(
                "model.spec=te needs a CUDA GPU; on the CPU use model.spec=local"
            )
        return "te"
    return "te" if (have_te and device_type == "cuda") else "local"


def local_layer_spec() -> ModuleSpec:
    """Megatron's layer with pure-PyTorch parts: SDPA/Flex attention, SP-capable RMSNorm."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=DanubeRMSNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=DanubeRMSNorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(
                    linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear
                ),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


def te_layer_spec() -> ModuleSpec:
    """megatron-core's own Transformer Engine spec (fused norm+linear, TE attention, FP8)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def local_block_spec(config, vp_stage=None) -> ModuleSpec:
    """The local layers plus a final norm that also supports sequence parallelism.

    Given only a layer spec, megatron picks the block's final norm itself (WrappedTorchNorm on
    a machine without TE), which refuses SP.
    """
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[local_layer_spec()] * num_layers, layer_norm=DanubeRMSNorm
        ),
    )


def decoder_spec(spec: str, config, vp_stage=None) -> ModuleSpec:
    """What GPTModel takes as `transformer_layer_spec` for this rank's chunk."""
    if spec == "te":
        return te_layer_spec()
    if spec == "local":
        return local_block_spec(config, vp_stage)
    raise DanubeConfigError(f"resolved spec must be 'te' or 'local', got {spec!r}")
