"""The local spec's attention and norm: against naive references and against HF Mistral."""

import math

import pytest
import torch

from megatron_danube.models.local_layers import sliding_window_mask, windowed_attention


def naive_attention(q, k, v, window):
    """Explicit softmax(QK^T/sqrt(d) + mask) V with GQA by repetition, fp64."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    s = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    if window is not None:
        i = torch.arange(s)
        allowed &= (i[:, None] - i[None, :]) < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("seq,window", [(32, 8), (33, 5), (16, 16), (16, 64), (24, 1), (20, None)])
def test_windowed_attention_matches_naive_reference(seq, window):
    g = torch.Generator().manual_seed(seq * 100 + (window or 0))
    q = torch.randn(2, 4, seq, 16, generator=g)
    k = torch.randn(2, 2, seq, 16, generator=g)  # GQA: 2 KV heads for 4 query heads
    v = torch.randn(2, 2, seq, 16, generator=g)
    out = windowed_attention(q, k, v, window, use_flex=False)
    ref = naive_attention(q, k, v, window)
    assert torch.allclose(out.double(), ref, atol=2e-6), (out.double() - ref).abs().max()


def test_window_covers_w_keys_including_the_current_token():
    mask = sliding_window_mask(6, 3, "cpu")
    assert mask[5].tolist() == [False, False, False, True, True, True]
    assert mask[1].tolist() == [True, True, False, False, False, False]


def test_window_changes_the_result_when_shorter_than_the_sequence():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    assert not torch.allclose(windowed_attention(q, k, v, 4), windowed_attention(q, k, v, None))


def skip_without_cpu_flex_attention():
    """Skip where FlexAttention cannot run on the CPU: a torch without it, or no C++ compiler
    for inductor to build its CPU kernels with. Any other error is the test's failure."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        pytest.skip("FlexAttention on the CPU needs a C++ compiler (inductor); none found")


def test_flex_attention_path_matches_naive_reference_on_cpu():
    """The GPU path (FlexAttention + block mask), compiled for the CPU here."""
    skip_without_cpu_flex_attention()
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 256, 16, generator=g)
    k = torch.randn(1, 2, 256, 16, generator=g)
    v = torch.randn(1, 2, 256, 16, generator=g)
    out = windowed_attention(q, k, v, 40, use_flex=True)
    ref = naive_attention(q, k, v, 40)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()


def test_rmsnorm_matches_hf_mistral_rmsnorm(single_rank):
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm

    from megatron_danube.config import ParallelLayout
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.models.local_layers import DanubeRMSNorm
    from megatron_danube.models.presets import get_preset

    config = build_transformer_config(
        get_preset("danube-test"), ParallelLayout(), spec="local", device_type="cpu"
    )
    ours, theirs = DanubeRMSNorm(config, 64, eps=1e-5), MistralRMSNorm(64, eps=1e-5)
    w = torch.randn(64)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    x = torch.randn(3, 5, 64) * 3
    assert torch.equal(ours(x), theirs(x))
    assert ours.weight.sequence_parallel is False


def _megatron_and_hf(single_rank, attn_implementation):
    from transformers import MistralForCausalLM

    from megatron_danube.config import ParallelLayout
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.models.full_weights import full_named_parameters
    from megatron_danube.models.hf_adapter import mcore_to_hf, mistral_config
    from megatron_danube.models.presets import get_preset

    model = get_preset("danube-test")
    config = build_transformer_config(model, ParallelLayout(), spec="local", device_type="cpu")
    torch.manual_seed(3)
    chunks = build_model_chunks(model, config, "local", torch.device("cpu"))
    # Non-trivial norm weights, so a norm mapped to the wrong place shows.
    with torch.no_grad():
        for name, p in chunks[0].named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)
    hf_cfg = mistral_config(model, attn_implementation)
    hf = MistralForCausalLM(hf_cfg).eval()
    hf.load_state_dict(mcore_to_hf(full_named_parameters(chunks[0]), model), strict=True)
    return model, chunks[0].eval(), hf


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_local_model_matches_hf_mistral_with_sliding_window(single_rank, attn_implementation):
    model, ours, hf = _megatron_and_hf(single_rank, attn_implementation)
    seq = 40  # five times the window of 8
    ids = torch.randint(0, model.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(seq).expand(2, seq)
    with torch.no_grad():
        logits = ours(ids, pos, None)[..., : model.vocab_size]
        ref = hf(input_ids=ids).logits
    assert torch.allclose(logits, ref, atol=1e-5, rtol=1e-5), (logits - ref).abs().max()
    # The window matters: a model without it gives different logits for late tokens.
    hf.config.sliding_window = None
    with torch.no_grad():
        no_window = hf(input_ids=ids).logits
    assert (no_window[:, -1] - ref[:, -1]).abs().max() > 1e-3


def naive_document_attention(q, k, v, documents, window):
    """Each document alone through the naive windowed reference, outputs put back in place."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for doc in documents.unique():
        idx = (documents == doc).nonzero().view(-1)
        out[:, :, idx] = naive_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], window)
    return out


@pytest.mark.parametrize("use_flex", [False, True], ids=["dense_mask", "flex_block_mask"])
def test_document_mask_attends_within_each_document(use_flex):
    """Packed documents: the dense mask (CPU path) and FlexAttention's block mask (GPU path,
    compiled for the CPU here) equal each document run alone, window included."""
    from megatron_danube.models.local_layers import document_ids

    if use_flex:
        skip_without_cpu_flex_attention()
    g = torch.Generator().manual_seed(3)
    cu_seqlens = torch.tensor([0, 70, 75, 200, 256], dtype=torch.int32)
    documents = document_ids(cu_seqlens, "cpu")
    q = torch.randn(1, 4, 256, 16, generator=g)
    k = torch.randn(1, 2, 256, 16, generator=g)
    v = torch.randn(1, 2, 256, 16, generator=g)
    out = windowed_attention(q, k, v, 40, use_flex=use_flex, documents=documents)
    ref = naive_document_attention(q, k, v, documents, 40)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
    whole = windowed_attention(q, k, v, 40, use_flex=False)
    assert not torch.allclose(whole.double(), ref, atol=1e-3)  # the bounds do matter here
