"""FP8 recipe checks per GPU generation and the TE/local parameter names, on the CPU."""

import pytest

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.hf_adapter import expected_mcore_shapes, local_name
from megatron_danube.models.presets import get_preset
from megatron_danube.models.te_support import attention_backend, fp8_problem

HOPPER, AMPERE, ADA, BLACKWELL = (9, 0), (8, 0), (8, 9), (10, 0)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_recipes_run_on_ada_hopper_and_blackwell(recipe):
    for capability in (ADA, HOPPER, BLACKWELL):
        assert fp8_problem(recipe, capability) is None


def test_mxfp8_is_refused_on_hopper_naming_the_recipes_that_run():
    problem = fp8_problem("mxfp8", HOPPER)
    assert "Blackwell GPU (sm_100)" in problem and "sm_90" in problem
    assert "precision.fp8=delayed" in problem
    assert fp8_problem("mxfp8", BLACKWELL) is None


def test_fp8_on_a_gpu_without_fp8_tensor_cores_says_to_train_in_bf16():
    problem = fp8_problem("delayed", AMPERE)
    assert "sm_80" in problem and "unset precision.fp8" in problem
    assert "unset precision.fp8" in fp8_problem("mxfp8", AMPERE)


def test_unknown_recipe_and_no_recipe():
    assert "choose one of" in fp8_problem("fp4", HOPPER)
    assert fp8_problem(None, AMPERE) is None


def test_fp8_with_the_local_spec_is_refused_before_any_process_group():
    from megatron_danube.config import ParallelLayout
    from megatron_danube.runtime.distributed import check_layout

    with pytest.raises(DanubeConfigError, match="precision.fp8='tensorwise' needs Transformer"):
        check_layout(
            get_preset("danube-test"),
            ParallelLayout(),
            spec="local",
            device="cpu",
            env={},
            fp8="tensorwise",
        )


def test_te_names_map_to_local_names_and_nothing_else_moves():
    model = get_preset("danube-1.8b")
    shapes = expected_mcore_shapes(model)
    te_only = [n for n in shapes if "layer_norm_weight" in n]
    assert len(te_only) == 2 * model.num_layers
    for name in te_only:
        local = local_name(name)
        assert local != name and local in shapes and shapes[local] == shapes[name]
    assert local_name("decoder.layers.23.self_attention.linear_qkv.layer_norm_weight") == (
        "decoder.layers.23.input_layernorm.weight"
    )
    assert local_name("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == (
        "decoder.layers.3.pre_mlp_layernorm.weight"
    )
    for name in shapes:
        if "layer_norm_weight" not in name:
            assert local_name(name) == name


def test_no_attention_backend_before_transformer_engine_ran():
    assert attention_backend() is None
