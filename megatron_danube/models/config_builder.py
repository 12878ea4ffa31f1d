"""From a preset plus run settings to megatron's TransformerConfig and GPTModel arguments."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_danube.config.sections import ParallelLayout, PrecisionConfig, RecomputeConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.presets import DanubeModelConfig
from megatron_danube.models.te_support import check_fp8

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transformer_config(
    model: DanubeModelConfig,
    layout: ParallelLayout,
    *,
    spec: str,
    device_type: str,
    precision: Optional[PrecisionConfig] = None,
    recompute: Optional[RecomputeConfig] = None,
    **overrides: Any,
) -> TransformerConfig:
    precision = precision or PrecisionConfig()
    recompute = recompute or RecomputeConfig()
    if precision.params_dtype not in DTYPES:
        raise DanubeConfigError(
            f"precision.params_dtype={precision.params_dtype!r}; choose one of {sorted(DTYPES)}"
        )
    dtype = DTYPES[precision.params_dtype]
    check_fp8(precision.fp8, spec, device_type)
    if recompute.granularity not in (None, "selective", "full"):
        raise DanubeConfigError(
            f"recompute.granularity={recompute.granularity!r}; choose null, selective or full"
        )
    on_gpu = device_type == "cuda"
    window = None
    if model.sliding_window is not None:
        # TE/flash semantics: keys in [q - left, q] -> left + 1 keys including the current one.
        window = (model.sliding_window - 1, 0)
    pp, vpp = layout.pipeline_parallel, layout.virtual_pipeline
    kwargs: Dict[str, Any] = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        window_size=window,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        context_parallel_size=layout.context_parallel,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # PP=2 with interleaving: prev and next rank are the same peer, and batched p2p
        # silently mixes up microbatches (wrong loss, no error). Unbatched p2p is exact.
        batch_p2p_comm=not (pp == 2 and vpp > 1),
        use_cpu_initialization=not on_gpu,
        # Fusions only with TE on GPU. The local spec keeps the unfused ops that the CPU tests
        # verify until a GPU run has measured the fused ones.
        bias_activation_fusion=on_gpu and spec == "te",
        bias_dropout_fusion=on_gpu and spec == "te",
        masked_softmax_fusion=False,
        apply_rope_fusion=on_gpu and spec == "te",
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=on_gpu and spec == "te",
        cross_entropy_fusion_impl="native",
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.method if recompute.granularity == "full" else None,
        recompute_num_layers=recompute.num_layers if recompute.granularity == "full" else None,
    )
    if precision.fp8 is not None:
        kwargs.update(
            fp8="hybrid",
            fp8_recipe=precision.fp8,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def gpt_model_kwargs(model: DanubeModelConfig) -> Dict[str, Any]:
    """The GPTModel arguments a preset fixes (everything but config, spec and stage flags)."""
    return dict(
        vocab_size=model.padded_vocab_size,
        max_sequence_length=model.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        rotary_percent=1.0,
        share_embeddings_and_output_weights=False,
        parallel_output=True,
    )
