"""Pure-PyTorch layers for the "local" spec: CPU runs and GPUs without Transformer Engine.

* `DanubeRMSNorm`: RMSNorm computed as HF Mistral does, usable with sequence parallelism
  (megatron's WrappedTorchNorm refuses SP). Its weight is marked `sequence_parallel`, so
  megatron's `finalize_model_grads` all-reduces its gradient over the TP group.
* `SDPAttention`: core attention on `scaled_dot_product_attention` with native GQA. With a
  sliding window longer sequences go through FlexAttention with a block mask on GPU (no s x s
  mask is materialised); on the CPU a boolean band mask is used. Packed sequences (megatron's
  THD `PackedSeqParams`, as chat fine-tuning feeds them) attend within their own document only:
  a FlexAttention block mask built from the document ids on GPU, the equivalent dense mask on
  the CPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention


class DanubeRMSNorm(torch.nn.Module):
    """y = weight * (x / rms(x)), normalised in fp32 and cast back before the weight (as HF)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(
            torch.ones(hidden_size, dtype=config.params_dtype, device=_param_device(config))
        )
        # Read by megatron's finalize_model_grads: all-reduce this grad over TP under SP.
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden.dtype
        h = hidden.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)


def _param_device(config: TransformerConfig):
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return None  # the default device (CPU, or an active `torch.device` context)
    return torch.cuda.current_device()


def window_keys(config: TransformerConfig, layer_number: int) -> Optional[int]:
    """Keys a query may see in this layer (current token included), or None for full causal."""
    if not is_layer_window_attention(
        config.window_size, config.window_attn_skip_freq, layer_number
    ):
        return None
    left, right = config.window_size
    if right != 0:
        raise ValueError(
            f"only causal windows (right == 0) are supported, got {config.window_size}"
        )
    return None if left < 0 else left + 1


def sliding_window_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """Boolean [s, s] mask, True where attention is allowed: causal, at most `window` keys."""
    q = torch.arange(seq_len, device=device).unsqueeze(1)
    k = torch.arange(seq_len, device=device).unsqueeze(0)
    return (k <= q) & (q - k < window)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=16)
def _flex_window_block_mask(seq_len: int, window: int, device_str: str):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device_str)


def document_ids(cu_seqlens: torch.Tensor, device) -> torch.Tensor:
    """[t] index of the document each packed position belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)


def document_mask(documents: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Boolean [t, t], True where allowed: same document, causal, within the window."""
    q = torch.arange(len(documents), device=documents.device).unsqueeze(1)
    k = q.transpose(0, 1)
    allowed = (documents.unsqueeze(1) == documents.unsqueeze(0)) & (k <= q)
    if window is not None:
        allowed &= q - k < window
    return allowed


def _flex_document_block_mask(documents: torch.Tensor, window: Optional[int]):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (documents[q_idx] == documents[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        return allowed

    n = len(documents)
    return create_block_mask(mask_mod, None, None, n, n, device=str(documents.device))


def windowed_attention(
    q,
    k,
    v,
    window: Optional[int],
    use_flex: Optional[bool] = None,
    documents: Optional[torch.Tensor] = None,
):
    """Causal attention on [b, heads, s, d] tensors; k/v may have fewer (GQA) heads.

    `documents` ([s] ints) restricts each query to keys of its own document (packed sequences).
    """
    seq_len = q.shape[-2]
    if use_flex is None:
        use_flex = q.is_cuda
    if documents is not None:
        if use_flex:
            block_mask = _flex_document_block_mask(documents, window)
            return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)
        mask = document_mask(documents, window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    if window is None or window >= seq_len:
        # The window changes nothing: plain causal (flash on GPU).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if use_flex:
        block_mask = _flex_window_block_mask(seq_len, window, str(q.device))
        return _compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=True)
    mask = sliding_window_mask(seq_len, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class SDPAttention(MegatronModule):
    """Drop-in for megatron's core attention: [s, b, heads, d] in, [s, b, heads * d] out."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError("the local attention does not support context parallelism; use TE")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("the local attention has no dropout (Danube trains without it)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"the local attention is causal only, got {attn_mask_type}")
        if softmax_scale is not None and abs(softmax_scale - config.kv_channels**-0.5) > 1e-12:
            raise ValueError("the local attention uses the default 1/sqrt(head_dim) scale")
        self.window = window_keys(config, layer_number)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("the local attention has no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = windowed_attention(q, k, v, self.window)
        seq, batch = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)

    def _packed(self, query, key, value, params) -> torch.Tensor:
        """THD: [t, heads, d] holding several documents back to back -> [t, heads * d]."""
        if params.qkv_format != "thd":
            raise ValueError(f"the local attention packs THD only, got {params.qkv_format!r}")
        if params.cu_seqlens_q_padded is not None or not torch.equal(
            params.cu_seqlens_q, params.cu_seqlens_kv
        ):
            raise ValueError("the local attention needs equal, unpadded q/kv cu_seqlens")
        documents = document_ids(params.cu_seqlens_q, query.device)
        if len(documents) != query.shape[0]:
            raise ValueError(
                f"cu_seqlens cover {len(documents)} tokens, the row has {query.shape[0]}"
            )
        # [t, h, d] -> [1, h, t, d]
        q, k, v = (t.permute(1, 0, 2).unsqueeze(0) for t in (query, key, value))
        out = windowed_attention(q, k, v, self.window, documents=documents)
        return out.squeeze(0).permute(1, 0, 2).reshape(query.shape[0], -1)
