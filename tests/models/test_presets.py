import pytest
import torch

from megatron_danube.config import ParallelLayout
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.builder import build_model_chunks, count_parameters
from megatron_danube.models.config_builder import build_transformer_config
from megatron_danube.models.presets import get_preset, list_presets

DANUBE_1_8B_PARAMS = 1_831_201_280  # HF MistralForCausalLM's count for h2oai/h2o-danube-1.8b-base


def test_danube_presets_match_the_released_configs():
    d1, d2 = get_preset("danube-1.8b"), get_preset("danube2-1.8b")
    for m in (d1, d2):
        assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.num_query_groups) == (
            2560,
            24,
            32,
            8,
        )
        assert (m.ffn_hidden_size, m.vocab_size, m.norm_eps, m.rope_theta) == (
            6912,
            32000,
            1e-5,
            10000.0,
        )
    assert (d1.sliding_window, d1.max_position_embeddings) == (4096, 16384)
    assert (d2.sliding_window, d2.max_position_embeddings) == (None, 8192)


def test_small_presets_exercise_gqa_and_the_window():
    for name in ("danube-test", "danube-tiny"):
        m = get_preset(name)
        assert m.num_query_groups < m.num_attention_heads
        assert m.sliding_window < m.max_position_embeddings


def test_danube_1_8b_parameter_count_arithmetic():
    assert get_preset("danube-1.8b").num_parameters() == DANUBE_1_8B_PARAMS
    # 32000 is already a multiple of 128: no padding rows
    assert get_preset("danube-1.8b").padded_vocab_size == 32000


def test_danube_1_8b_parameter_count_of_a_meta_build(single_rank):
    """Build the real GPTModel on the meta device (nothing allocated) and count."""
    model = get_preset("danube-1.8b")
    config = build_transformer_config(
        model, ParallelLayout(), spec="local", device_type="cpu", perform_initialization=False
    )
    with torch.device("meta"):
        chunks = build_model_chunks(model, config, "local", torch.device("meta"))
    assert all(p.is_meta for p in chunks[0].parameters())
    assert count_parameters(chunks) == DANUBE_1_8B_PARAMS


def test_small_preset_build_matches_arithmetic(single_rank):
    model = get_preset("danube-test")
    config = build_transformer_config(model, ParallelLayout(), spec="local", device_type="cpu")
    chunks = build_model_chunks(model, config, "local", torch.device("cpu"))
    assert count_parameters(chunks) == model.num_parameters(padded_vocab=True)
    assert model.padded_vocab_size == 256 and model.vocab_size == 250


def test_unknown_preset_is_a_one_line_error():
    with pytest.raises(DanubeConfigError, match="unknown model preset 'danube-9b'") as e:
        get_preset("danube-9b")
    assert "\n" not in str(e.value)
    assert "danube-1.8b" in str(e.value)
    assert set(list_presets()) >= {"danube-1.8b", "danube2-1.8b", "danube-tiny", "danube-test"}


def test_replace_rejects_unknown_fields():
    with pytest.raises(DanubeConfigError, match="hidden"):
        get_preset("danube-test").replace(hiden_size=3)
