"""Every impossible layout is a one-line error naming the conflicting numbers."""

import pytest

from megatron_danube.config import ParallelLayout, PrecisionConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.config_builder import build_transformer_config
from megatron_danube.models.layer_specs import resolve_spec, transformer_engine_available
from megatron_danube.models.presets import get_preset
from megatron_danube.runtime.layout import validate_layout

D18 = get_preset("danube-1.8b")


def check(layout, world, match, model=D18, **kw):
    with pytest.raises(DanubeConfigError, match=match) as e:
        validate_layout(layout, model, world, **kw)
    assert "\n" not in str(e.value)


def test_valid_layouts_pass():
    validate_layout(ParallelLayout(tensor_parallel=8), D18, 8)
    validate_layout(
        ParallelLayout(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True),
        D18,
        8,
        seq_length=16384,
    )
    validate_layout(ParallelLayout(pipeline_parallel=4, virtual_pipeline=2), D18, 16)
    assert ParallelLayout(tensor_parallel=2, pipeline_parallel=2).data_parallel(16) == 4


def test_world_size_not_divisible_by_model_parallel():
    check(
        ParallelLayout(tensor_parallel=2, pipeline_parallel=2),
        6,
        r"world size 6 is not divisible by TP\(2\) x PP\(2\) x CP\(1\) = 4",
    )


def test_heads_not_divisible_by_tp():
    check(
        ParallelLayout(tensor_parallel=3),
        3,
        "num_attention_heads 32 is not divisible by tensor_parallel 3",
    )


def test_kv_groups_not_divisible_by_tp():
    check(
        ParallelLayout(tensor_parallel=16),
        16,
        "num_query_groups \\(KV heads\\) 8 is not divisible by tensor_parallel 16",
    )


def test_layers_not_divisible_by_pp_times_vpp():
    check(
        ParallelLayout(pipeline_parallel=5),
        5,
        "num_layers 24 is not divisible by pipeline_parallel 5 x virtual_pipeline 1 = 5",
    )
    check(
        ParallelLayout(pipeline_parallel=4, virtual_pipeline=4),
        4,
        "num_layers 24 is not divisible by pipeline_parallel 4 x virtual_pipeline 4 = 16",
    )


def test_virtual_pipeline_without_pipeline():
    check(ParallelLayout(virtual_pipeline=2), 1, "virtual_pipeline 2 needs pipeline_parallel > 1")


def test_sequence_parallel_needs_tp():
    check(ParallelLayout(sequence_parallel=True), 1, "sequence_parallel needs tensor_parallel > 1")


def test_sequence_length_checks():
    check(
        ParallelLayout(tensor_parallel=2, sequence_parallel=True),
        2,
        "sequence length 2047 is not divisible by tensor_parallel 2",
        seq_length=2047,
    )
    check(ParallelLayout(), 1, "sequence length 32768 exceeds", seq_length=32768)


def test_context_parallel_needs_te():
    check(
        ParallelLayout(context_parallel=2),
        2,
        "context_parallel 2 needs the Transformer Engine",
        spec="local",
    )


def test_sizes_must_be_positive_integers():
    check(ParallelLayout(tensor_parallel=0), 1, "parallel.tensor_parallel must be an integer >= 1")


def test_ffn_and_vocab_divisibility():
    m = get_preset("danube-test").replace(ffn_hidden_size=161)
    check(ParallelLayout(tensor_parallel=2), 2, "ffn_hidden_size 161 is not divisible", model=m)
    m = get_preset("danube-test").replace(vocab_pad_multiple=1, vocab_size=251)
    check(ParallelLayout(tensor_parallel=2), 2, "padded vocab 251 is not divisible", model=m)


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is installed")
def test_te_requested_without_te_is_one_line_error():
    with pytest.raises(DanubeConfigError, match="transformer_engine is not installed"):
        resolve_spec("te", "cuda")
    assert resolve_spec("auto", "cpu") == "local"
    assert resolve_spec("auto", "cuda") == "local"  # no TE: fall back


def test_fp8_without_te_is_one_line_error():
    with pytest.raises(DanubeConfigError, match="precision.fp8='delayed' needs Transformer Engine"):
        build_transformer_config(
            get_preset("danube-test"),
            ParallelLayout(),
            spec="local",
            device_type="cpu",
            precision=PrecisionConfig(fp8="delayed"),
        )


def test_unknown_spec_choice():
    with pytest.raises(DanubeConfigError, match="model.spec='fast'"):
        resolve_spec("fast", "cpu")


def test_pp2_with_virtual_pipeline_uses_unbatched_p2p():
    """The silent wrong-loss trap: batched p2p with PP=2 + VPP mixes up microbatches."""
    m = get_preset("danube-test")
    cfg = build_transformer_config(
        m, ParallelLayout(pipeline_parallel=2, virtual_pipeline=2), spec="local", device_type="cpu"
    )
    assert cfg.batch_p2p_comm is False
    cfg = build_transformer_config(
        m, ParallelLayout(pipeline_parallel=2), spec="local", device_type="cpu"
    )
    assert cfg.batch_p2p_comm is True


def test_window_is_handed_to_megatron_in_flash_semantics():
    cfg = build_transformer_config(
        D18, ParallelLayout(), spec="local", device_type="cpu", perform_initialization=False
    )
    assert cfg.window_size == (4095, 0)  # keys [q-4095, q]: 4096 keys including the current one
    cfg = build_transformer_config(
        get_preset("danube2-1.8b"),
        ParallelLayout(),
        spec="local",
        device_type="cpu",
        perform_initialization=False,
    )
    assert cfg.window_size is None
