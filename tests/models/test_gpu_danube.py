"""danube-1.8b with the local spec on a real GPU, against HF transformers on the same weights.

Run on an H100/H200: `pytest -m gpu -s tests/models/test_gpu_danube.py`. Skipped without CUDA.
"""

import time

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def models():
    import os

    from transformers import MistralForCausalLM

    from megatron_danube.config import ParallelLayout, PrecisionConfig
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.models.config_builder import build_transformer_config
    from megatron_danube.models.full_weights import full_named_parameters
    from megatron_danube.models.hf_adapter import mcore_to_hf, mistral_config
    from megatron_danube.models.presets import get_preset
    from megatron_danube.runtime.distributed import initialize
    from tests.conftest import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    model = get_preset("danube-1.8b")
    rt = initialize(model, ParallelLayout(), spec="local", device="cuda")
    config = build_transformer_config(
        model,
        ParallelLayout(),
        spec="local",
        device_type="cuda",
        precision=PrecisionConfig(params_dtype="bfloat16"),
    )
    ours = build_model_chunks(model, config, "local", rt.device)[0]
    hf_cfg = mistral_config(model)
    with torch.device("cuda"):
        hf = MistralForCausalLM(hf_cfg).to(torch.bfloat16)
    hf.load_state_dict(mcore_to_hf(full_named_parameters(ours), model), strict=True)
    return model, ours, hf


@pytest.mark.parametrize("seq", [2048, 16384])
def test_danube_1_8b_local_spec_matches_hf_on_gpu(models, seq):
    model, ours, hf = models
    assert sum(p.numel() for p in ours.parameters()) == 1_831_201_280
    g = torch.Generator(device="cuda").manual_seed(seq)
    ids = torch.randint(0, model.vocab_size, (1, seq + 1), device="cuda", generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq, device="cuda").unsqueeze(0)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits = ours(inputs, pos, None)[..., : model.vocab_size].float()
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
    loss.backward()
    torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = hf(input_ids=inputs).logits.float()
    ref_loss = torch.nn.functional.cross_entropy(ref.view(-1, ref.shape[-1]), labels.view(-1))
    ref_loss.backward()
    torch.cuda.synchronize()
    t_hf = time.perf_counter() - t0

    rel = ((logits - ref).norm() / ref.norm()).item()
    grad_ours = ours.decoder.layers[0].self_attention.linear_proj.weight.grad.float()
    grad_hf = hf.model.layers[0].self_attn.o_proj.weight.grad.float()
    grad_rel = ((grad_ours - grad_hf).norm() / grad_hf.norm()).item()
    print(
        f"\nseq {seq}: logits rel {rel:.2e}, loss {loss.item():.5f} vs {ref_loss.item():.5f}, "
        f"o_proj grad rel {grad_rel:.2e}, fwd+bwd {t_ours * 1e3:.0f} ms (HF {t_hf * 1e3:.0f} ms), "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    assert rel < 2e-2
    assert abs(loss.item() - ref_loss.item()) < 2e-2
    assert grad_rel < 5e-2
    ours.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)
