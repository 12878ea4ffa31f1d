"""Activation recomputation (selective, full) changes memory, never the model."""

import pytest
import torch

from megatron_danube.config import ParallelLayout, RecomputeConfig
from megatron_danube.models.builder import build_model_chunks
from megatron_danube.models.config_builder import build_transformer_config
from megatron_danube.models.full_weights import full_named_parameters, load_full_weights
from megatron_danube.models.presets import get_preset

MODEL = get_preset("danube-test")


def loss_and_grads(recompute, weights=None):
    config = build_transformer_config(
        MODEL, ParallelLayout(), spec="local", device_type="cpu", recompute=recompute
    )
    model = build_model_chunks(MODEL, config, "local", torch.device("cpu"))[0]
    if weights is not None:
        load_full_weights([model], weights)
    ids = torch.randint(0, MODEL.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    loss = model(ids[:, :-1], torch.arange(32).expand(2, 32), None, labels=ids[:, 1:]).mean()
    loss.backward()
    return model, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "recompute",
    [
        RecomputeConfig("selective"),
        RecomputeConfig("full", "uniform", 1),
        RecomputeConfig("full", "block", 2),
    ],
)
def test_recompute_gives_the_same_loss_and_grads(single_rank, recompute):
    model, ref_loss, ref_grads = loss_and_grads(RecomputeConfig())
    weights = full_named_parameters(model)
    _, loss, grads = loss_and_grads(recompute, weights)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-5, atol=1e-7), name
