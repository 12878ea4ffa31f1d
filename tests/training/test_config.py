import pytest

from megatron_danube.config import load_config
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training.preflight import build_plan
from megatron_danube.training.stages import plan_stages, stage_at

DEMO = "examples/configs/danube-tiny-cpu.yaml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(
        DEMO,
        [
            "train.train_tokens=2048",
            "parallel.tensor_parallel=2",
            "optim.lr=1e-4",
            "stages.1.seq_length=256",
        ],
    )
    assert cfg.train.train_tokens == 2048 and cfg.parallel.tensor_parallel == 2
    assert cfg.optim.lr == 1e-4 and cfg.stages[1].seq_length == 256
    assert cfg.model.preset == "danube-tiny"


def test_unknown_key_is_one_line_error_naming_it():
    with pytest.raises(DanubeConfigError, match="unknown config key 'optim.learning_rate'") as e:
        load_config(DEMO, ["optim.learning_rate=1"])
    assert "\n" not in str(e.value)


def test_wrong_type_names_the_key(tmp_path):
    with pytest.raises(DanubeConfigError, match="train.micro_batch_size: expected an integer"):
        load_config(DEMO, ["train.micro_batch_size=two"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("checkpoint:\n  async_save: maybe\n")
    with pytest.raises(DanubeConfigError, match="checkpoint.async_save: expected true or false"):
        load_config(str(bad))


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(DanubeConfigError, match="cannot read config"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(DanubeConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_stage_plan_keeps_tokens_per_step_constant():
    cfg = load_config(DEMO)
    stages = plan_stages(cfg, data_parallel=2)
    assert [s.seq_length for s in stages] == [64, 128]
    assert [s.global_batch_seqs * s.seq_length for s in stages] == [1024, 1024]
    assert [s.num_microbatches for s in stages] == [2, 1]
    assert stage_at(stages, 163839).index == 0 and stage_at(stages, 163840).index == 1
    assert stages[1].sample_index(163840 + 3 * 1024) == 24


def test_danube_1_8b_example_stages():
    cfg = load_config("examples/configs/danube-1.8b.yaml", ["data.blend=[x]"])
    stages = plan_stages(cfg, data_parallel=8)
    assert [s.seq_length for s in stages] == [2048, 4096, 8192, 16384]


@pytest.mark.parametrize(
    "override,match",
    [
        ("stages.1.seq_length=96", "not a multiple of stages\\[1\\].seq_length"),
        ("train.global_batch_tokens=1000", "train_tokens 307200 is not a multiple"),
        ("stages.1.start_tokens=1000", "not a multiple of train.global_batch_tokens"),
        ("train.micro_batch_size=3", "do not split into micro-batches"),
        ("stages.0.start_tokens=64", "must be 0"),
    ],
)
def test_impossible_stage_plans(override, match):
    cfg = load_config(DEMO, [override])
    with pytest.raises(DanubeConfigError, match=match):
        plan_stages(cfg, data_parallel=2)


@pytest.mark.parametrize(
    "override,match",
    [
        ("logging.log_interval=0", "logging.log_interval=0; it must be >= 1"),
        ("stages.5.seq_length=64", "stages.5 is not an existing list index"),
        ("stages.x.seq_length=64", "stages.x is not an existing list index"),
        ("stages=[]", "stages is empty"),
        ("optim.lr=-1", "optim.lr=-1.0; the learning rate must be >= 0"),
        ("optim.adam_beta2=2", "optim.adam_beta2=2.0; it must be in \\[0, 1\\)"),
        ("optim.lr=.nan", "optim.lr: expected a finite number"),
        ("checkpoint.save_interval=-5", "checkpoint.save_interval=-5"),
        ("checkpoint.keep_last=0", "keep at least 1"),
        ("logging.eval_iters=-1", "logging.eval_iters=-1"),
        ("train.train_tokens=-1024", "train.train_tokens=-1024; it must be > 0"),
        ("train.device=gpu", "train.device='gpu'; choose one of auto, cuda, cpu"),
        ("model.spec=fast", "model.spec='fast'; choose one of auto, te, local"),
        ("precision.fp8=fp4", "precision.fp8='fp4'; choose one of delayed, tensorwise, mxfp8"),
        ("optim.distributed_optimizer=true", "did you mean 'optim.use_distributed_optimizer'"),
        ("train.micro_batch_sise=3", "did you mean 'train.micro_batch_size'?"),
        ("optim.lr", "must look like section.key=value"),
        ("optim.optimizer=adamw", "optim.optimizer='adamw'; use 'adam'"),
        ("optim.optimizer=sgd", "needs optim.use_distributed_optimizer=false"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(override, match):
    with pytest.raises(DanubeConfigError, match=match) as e:
        load_config(DEMO, [override])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("split", ["a,b,c", "0,100,0", "1,2", "-1,1,1"])
def test_bad_data_split_is_refused_before_anything_runs(split):
    cfg = load_config(DEMO, [f"data.split={split}", "run_dir=/tmp/danube-split-check"])
    with pytest.raises(DanubeConfigError, match="data.split="):
        build_plan(cfg)


@pytest.mark.parametrize("weight", ["0", ".nan", "-1"])
def test_bad_blend_weight_is_a_clear_error(weight):
    from megatron_danube.data.datasets import parse_blend

    with pytest.raises(DanubeConfigError, match="data.blend"):
        parse_blend(
            [float(weight) if weight != ".nan" else float("nan"), "a"] + [0.5, "b"]
            if weight != "0"
            else [0, "a", 0, "b"]
        )


def test_empty_yaml_uses_working_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cfg = load_config(str(empty))
    stages = plan_stages(cfg, data_parallel=1)  # the defaults agree
    assert stages[0].start_tokens == 0 and cfg.optim.warmup_tokens < cfg.train.train_tokens
    # the only thing an empty config lacks is the data, and that is what the error names
    with pytest.raises(DanubeConfigError, match="data.blend is empty"):
        build_plan(load_config(str(empty), [f"run_dir={tmp_path / 'run'}"]))


def test_a_stage_longer_than_the_model_context_is_named():
    """The stage is named (the layout check would only see the longest length)."""
    cfg = load_config(DEMO, ["stages.1.seq_length=1024", "train.global_batch_tokens=2048"])
    with pytest.raises(DanubeConfigError, match=r"stages\[1\].seq_length 1024 exceeds model"):
        build_plan(cfg)


def test_resolved_config_round_trips(tmp_path):
    from megatron_danube.config import save_config

    cfg = load_config(DEMO, ["optim.adam_beta1=0.8"])
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_a_key_of_a_newer_megatron_core_says_so():
    from megatron_danube import compat

    if compat.MCORE_VERSION >= compat.parse_version("0.18"):
        cfg = load_config(DEMO, ["optim.grad_norm_skip_threshold=5"])
        assert cfg.optim.grad_norm_skip_threshold == 5
        return
    with pytest.raises(DanubeConfigError, match="needs megatron-core 0.18 or newer") as e:
        load_config(DEMO, ["optim.grad_norm_skip_threshold=5"])
    assert "\n" not in str(e.value)


def test_a_renamed_key_says_what_it_is_now_and_old_schedules_compare_as_today():
    from megatron_danube.training import resume_checks

    with pytest.raises(DanubeConfigError, match="'chat.pack' is now 'chat.packing': bfd"):
        load_config(DEMO, ["chat.pack=true"])
    current = {"model": {}, "schedule": {"chat.packing": "bfd", "job": "sft"}}
    for pack, before in ((True, "greedy"), (False, "none")):
        saved = {"model": {}, "schedule": {"chat.pack": pack, "job": "sft"}}
        with pytest.raises(DanubeConfigError, match=f"chat.packing='{before}' but this run has"):
            resume_checks.check(saved, current, [], own=True)
    saved = {"model": {}, "schedule": {"chat.pack": True, "job": "sft"}}
    now = {"model": {}, "schedule": {"chat.packing": "greedy", "job": "sft"}}
    resume_checks.check(saved, now, [], own=True)  # the same packing: resumes
