"""danube-1.8b with the local spec on a real GPU against HF transformers on the same weights.

Both in fp32, so that any difference is one of meaning (RoPE, window, GQA layout, norms), not
of rounding: bf16 accuracy is measured against this fp32 reference in test_gpu_te.py. (An HF
model cast with `.to(torch.bfloat16)` also rounds its RoPE `inv_freq` buffer to bf16, which
moves its logits by tens of percent at 2048 positions: not a fair bf16 reference.)

Run on an H100/H200: `pytest -m gpu -s tests/models/test_gpu_danube.py`. Skipped without CUDA.
"""

import time

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def models():
    from transformers import MistralForCausalLM

    from megatron_danube.config import ParallelLayout, PrecisionConfig
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.models.full_weights import full_named_parameters
    from megatron_danube.models.hf_adapter import mcore_to_hf, mistral_config
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import initialize

    model = get_preset("danube-1.8b")
    rt = initialize(model, ParallelLayout(), spec="local", device="cuda")
    config = build_transformer_config(
        model,
        ParallelLayout(),
        spec="local",
        device_type="cuda",
        precision=PrecisionConfig(params_dtype="float32"),
    )
    ours = build_model_chunks(model, config, "local", rt.device)[0]
    with torch.device("cuda"):
        hf = MistralForCausalLM(mistral_config(model))
    hf.load_state_dict(mcore_to_hf(full_named_parameters(ours), model), strict=True)
    return model, ours, hf


@pytest.mark.parametrize("seq", [2048, 16384])
def test_danube_1_8b_local_spec_matches_hf_on_gpu(models, seq):
    """Logits at 2048 (window inactive) and 16384 (window active); gradients at 2048."""
    model, ours, hf = models
    assert sum(p.numel() for p in ours.parameters()) == 1_831_201_280
    with_grads = seq == 2048
    g = torch.Generator(device="cuda").manual_seed(seq)
    ids = torch.randint(0, model.vocab_size, (1, seq + 1), device="cuda", generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq, device="cuda").unsqueeze(0)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(with_grads):
        logits = ours(inputs, pos, None)[..., : model.vocab_size]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[0])
        if with_grads:
            loss.backward()
        torch.cuda.synchronize()
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = hf(input_ids=inputs).logits
        ref_loss = torch.nn.functional.cross_entropy(ref.reshape(-1, ref.shape[-1]), labels[0])
        if with_grads:
            ref_loss.backward()
        torch.cuda.synchronize()
        t_hf = time.perf_counter() - t0

    rel = ((logits.detach() - ref.detach()).norm() / ref.detach().norm()).item()
    grad_rel = float("nan")
    if with_grads:
        grad_ours = ours.decoder.layers[0].self_attention.linear_proj.weight.grad
        grad_hf = hf.model.layers[0].self_attn.o_proj.weight.grad
        grad_rel = ((grad_ours - grad_hf).norm() / grad_hf.norm()).item()
    print(
        f"\nseq {seq} (fp32): logits rel {rel:.2e}, loss {loss.item():.6f} vs "
        f"{ref_loss.item():.6f}, o_proj grad rel {grad_rel:.2e}, "
        f"{'fwd+bwd' if with_grads else 'fwd'} {t_ours * 1e3:.0f} ms (HF {t_hf * 1e3:.0f} ms), "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    assert rel < 1e-3
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    if with_grads:
        assert grad_rel < 1e-3
        ours.zero_grad(set_to_none=True)
        hf.zero_grad(set_to_none=True)
