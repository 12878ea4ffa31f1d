"""Jobs as registered specs: the registry, the frozen preflight plan, the declared hooks, and
the one model build with its pre-wrap hooks (in-process, one gloo rank)."""

import dataclasses
import os

import pytest
import torch

from megatron_danube.config import OptimSection, ParallelLayout, load_config, save_config
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training.job import Job, StepBatch
from megatron_danube.training.jobs import registry
from megatron_danube.training.preflight import build_plan

DEMO = "examples/configs/danube-tiny-cpu.yaml"


class _Start(str):
    chat: list


@pytest.fixture
def tiny_start(tmp_path):
    """A start checkpoint (a train state without tokenizer records) and one conversation."""
    import json

    start = tmp_path / "start"
    start.mkdir()  # a checkpoint by its train state (plans never load it)
    (start / "train_state.json").write_text(json.dumps({"iteration": 1}))
    data = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    data.write_text(json.dumps({"messages": turns}) + "\n")
    path = _Start(str(start))
    path.chat = [f"chat.train=[{data}]"]
    return path


def test_builtin_jobs_are_registered_with_their_alias_family():
    assert registry.job_names()[:3] == ["pretrain", "sft", "dpo"]
    assert [registry.get_job(n).family for n in ("pretrain", "sft", "dpo")] == [
        "pretrain",
        "finetune",
        "finetune",
    ]


def test_an_unknown_job_is_one_line_with_the_closest_name(tmp_path):
    cfg = load_config(DEMO, ["job=sfft", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(DanubeConfigError, match="job='sfft'; did you mean 'sft'\\? choose one of"):
        build_plan(cfg)


def test_a_second_job_under_one_name_is_refused():
    spec = registry.get_job("sft")
    with pytest.raises(ValueError, match="registered already"):
        registry.register_job(dataclasses.replace(spec, summary="another"))


class _CountingJob(Job):
    """A job of this test: one batch of fixed tokens per step."""

    name = "test-counting"


def test_a_registered_job_is_planned_through_the_registry(tmp_path):
    seen = []

    def plan(cfg):
        seen.append(cfg)
        return registry.get_job("pretrain").plan(cfg)

    spec = registry.register_job(
        registry.JobSpec("test-counting", "pretrain", plan, _CountingJob, "a test job")
    )
    try:
        cfg = load_config(DEMO, ["job=test-counting", f"run_dir={tmp_path / 'r'}"])
        planned = build_plan(cfg)
        assert seen and planned.job == "test-counting"
        assert isinstance(spec.make(planned), Job)
    finally:
        registry._JOBS.pop("test-counting")


def test_every_hook_has_a_default():
    """The trainer calls hooks without asking whether a job has them."""
    plan = build_plan(load_config(DEMO, ["run_dir=/tmp/danube-jobs-test"]))
    job = _CountingJob(plan)
    chunks = [torch.nn.Linear(2, 2)]
    assert job.transform_model(chunks) is chunks
    assert job.eval_batches(None) == [] and job.train_metrics({}) == {}
    assert job.state_extra(None) == {} and job.eval_metrics({}) == {}
    assert job.after_resume(None) is None and job.restored({}) is None
    assert job.total_tokens == plan.config.train.train_tokens
    assert job.schedule()["job"] == "test-counting"
    with pytest.raises(NotImplementedError, match="defines no train_batch"):
        job.train_batch(None)


def test_the_plan_is_frozen_and_the_callers_config_untouched(tmp_path, tiny_start):
    cfg = load_config(
        "tests/training/tiny_sft.yaml",
        [f"run_dir={tmp_path / 'r'}", f"checkpoint.load={tiny_start}", *tiny_start.chat],
    )
    assert cfg.checkpoint.load_optimizer  # the default; fine-tuning resolves it
    plan = build_plan(cfg)
    assert cfg.checkpoint.load_optimizer and not plan.config.checkpoint.load_optimizer
    assert plan.config is not cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.max_seq_length = 1
    with pytest.raises(TypeError):
        plan.inputs["tokenizer"] = "x"
    assert plan.chat.packs_per_step == cfg.train.global_batch_tokens // cfg.chat.seq_length
    assert "<|answer|>" in plan.chat.template  # resolved once, the text itself


def test_config_yaml_holds_what_ran_and_loads_back(tmp_path, tiny_start):
    cfg = load_config(
        "tests/training/tiny_sft.yaml",
        [f"run_dir={tmp_path / 'r'}", f"checkpoint.load={tiny_start}", *tiny_start.chat],
    )
    plan = build_plan(cfg)
    path = tmp_path / "config.yaml"
    save_config(plan.config, str(path), header=plan.summary())
    text = path.read_text()
    assert text.startswith("# job sft; model danube-tiny")
    again = load_config(str(path))
    assert again == plan.config and again.checkpoint.load_optimizer is False


def test_a_resumed_run_does_not_need_its_start_checkpoint(tmp_path, tiny_start):
    """A run with checkpoints of its own resumes from them alone; the start may be gone."""
    import json

    run_dir = tmp_path / "r"
    first = build_plan(
        load_config(
            "tests/training/tiny_sft.yaml",
            [f"run_dir={run_dir}", f"checkpoint.load={tiny_start}", *tiny_start.chat],
        )
    )
    gone = [f"run_dir={run_dir}", f"checkpoint.load={tmp_path / 'gone'}", *tiny_start.chat]
    with pytest.raises(DanubeConfigError, match="gone is not a directory"):
        build_plan(load_config("tests/training/tiny_sft.yaml", gone))
    own = run_dir / "checkpoints" / "iter_0000001"
    own.mkdir(parents=True)
    (own / "train_state.json").write_text(json.dumps({"inputs": dict(first.inputs)}))
    (run_dir / "checkpoints" / "latest").write_text("iter_0000001")
    plan = build_plan(load_config("tests/training/tiny_sft.yaml", gone))
    assert plan.resumes and "resumes its own checkpoints" in plan.summary()


# ---------------------------------------------------------------------------- model build
def test_pre_wrap_hooks_freeze_weights_that_then_do_not_train(single_rank):
    from megatron_danube.models.presets import get_preset
    from megatron_danube.training.model_build import build_model, wrap_for_training
    from megatron_danube.training.step import causal_lm_batch, train_step

    model_cfg = get_preset("danube-test")

    def freeze_all_but_output(chunks):
        for name, p in chunks[0].named_parameters():
            p.requires_grad = name.startswith("output_layer")
        return chunks

    torch.manual_seed(0)
    config, chunks = build_model(
        model_cfg,
        layout=ParallelLayout(),
        spec="local",
        device=torch.device("cpu"),
        pre_wrap=[freeze_all_but_output],
    )
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    model = wrap_for_training(config, chunks, OptimSection(lr=1e-2, warmup_tokens=0), 10**6)
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 17), generator=torch.Generator())
    result = train_step(
        model.chunks,
        model.optimizer,
        [iter([causal_lm_batch(tokens)])],
        num_microbatches=1,
        seq_length=16,
        micro_batch_size=2,
    )
    assert not result["skipped"]
    moved = {n for n, p in chunks[0].named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if n.startswith("output_layer")}


def test_a_build_whose_hooks_leave_nothing_to_train_is_refused(single_rank):
    from megatron_danube.models.presets import get_preset
    from megatron_danube.training.model_build import build_model

    def freeze_everything(chunks):
        for p in chunks[0].parameters():
            p.requires_grad = False
        return chunks

    with pytest.raises(ValueError, match="no parameter to train"):
        build_model(
            get_preset("danube-test"),
            layout=ParallelLayout(),
            spec="local",
            device=torch.device("cpu"),
            pre_wrap=[freeze_everything],
        )


def test_step_batch_and_job_live_below_the_trainer():
    """Jobs import the contract module, not the trainer (no job -> trainer edge)."""
    import ast

    jobs_dir = os.path.join(os.path.dirname(registry.__file__))
    for name in os.listdir(jobs_dir):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(jobs_dir, name)).read())
            modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert "megatron_danube.training.trainer" not in modules, name
    assert StepBatch.__module__ == "megatron_danube.training.job"


def test_dpo_from_a_checkpoint_without_manifest_is_refused_up_front(tmp_path, tiny_start):
    """DPO names its reference model by the start's manifest: without one, refused before
    anything runs (SFT may start from it)."""

    overrides = [f"run_dir={tmp_path / 'r'}", f"checkpoint.load={tiny_start}", *tiny_start.chat]
    with pytest.raises(DanubeConfigError, match="has no manifest.json, which identifies DPO"):
        build_plan(load_config("tests/training/tiny_dpo.yaml", overrides))
    assert build_plan(load_config("tests/training/tiny_sft.yaml", overrides)).job == "sft"


@pytest.mark.parametrize("verify", [True, False])
def test_the_start_point_follows_checkpoint_verify(tmp_path, tiny_start, verify):
    overrides = [f"run_dir={tmp_path / 'r'}", f"checkpoint.load={tiny_start}", *tiny_start.chat]
    overrides.append(f"checkpoint.verify={str(verify).lower()}")
    start = build_plan(load_config("tests/training/tiny_sft.yaml", overrides)).start
    assert start.checkpoint == str(tiny_start) and start.verify is verify
    assert start.load_optimizer is False and start.convert_from_hf is None


def test_lora_is_refused_on_the_te_spec_and_checked_for_its_values():
    from megatron_danube.training.preflight import lora_settings

    cfg = load_config(DEMO, ["peft.method=lora"])
    assert lora_settings(cfg, "local").rank == 8
    with pytest.raises(DanubeConfigError, match="set model.spec=local"):
        lora_settings(cfg, "te")
    with pytest.raises(DanubeConfigError, match="give rank >= 1"):
        lora_settings(load_config(DEMO, ["peft.method=lora", "peft.rank=0"]), "local")
    assert lora_settings(load_config(DEMO), "te") is None


def test_pretraining_refuses_peft(tmp_path):
    cfg = load_config(DEMO, ["peft.method=lora", f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(DanubeConfigError, match="peft trains adapters of a fine-tuning job"):
        build_plan(cfg)


def _peft_dir(tmp_path, **config):
    """An HF PEFT adapter directory as PEFT writes it (the tensors are never read here)."""
    import json

    path = tmp_path / "adapter"
    path.mkdir(parents=True)
    saved = dict(
        peft_type="LORA",
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        base_model_name_or_path="someone/remote-model",
    )
    saved.update(config)
    (path / "adapter_config.json").write_text(json.dumps(saved))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return str(path)


SFT = "tests/training/tiny_sft.yaml"
LORA_Q_V = ["peft.method=lora", "peft.rank=4", "peft.target_modules=[q_proj,v_proj]"]


def test_a_peft_adapter_starts_a_lora_run_on_its_base(tiny_start, tmp_path):
    from tests.training.conftest import plan_error

    adapter = _peft_dir(tmp_path)
    common = [*tiny_start.chat, f"run_dir={tmp_path / 'run'}", f"checkpoint.load={adapter}"]
    plan = build_plan(load_config(SFT, [*common, *LORA_Q_V, f"peft.base={tiny_start}"]))
    assert plan.start.peft_adapter == adapter and plan.start.checkpoint == str(tiny_start)
    assert plan.lora.rank == 4 and plan.lora.targets == {"linear_qkv": ("q_proj", "v_proj")}
    assert "adapters from PEFT" in plan.summary()
    base = f"peft.base={tiny_start}"
    assert "is an HF PEFT adapter; set peft.method=lora" in plan_error(*common, config=SFT)
    assert "not a local directory; set peft.base" in plan_error(*common, *LORA_Q_V, config=SFT)
    wrong = plan_error(*common, "peft.method=lora", base, config=SFT)
    assert "peft.rank=8 but the adapter has 4" in wrong and "target_modules" in wrong
    dora = _peft_dir(tmp_path / "d", use_dora=True)
    common[-1] = f"checkpoint.load={dora}"
    assert "use_dora is not plain LoRA" in plan_error(*common, *LORA_Q_V, base, config=SFT)


def test_a_lora_checkpoint_is_not_a_full_start_and_adapters_off_needs_lora(tiny_start, tmp_path):
    import json

    from tests.training.conftest import plan_error

    common = [*tiny_start.chat, f"run_dir={tmp_path / 'run'}", f"checkpoint.load={tiny_start}"]
    state = {"iteration": 1, "lora": {"rank": 4, "base_manifest": "0123"}}
    (tmp_path / "start" / "train_state.json").write_text(json.dumps(state))
    assert "holds a LoRA run's adapters only" in plan_error(*common, config=SFT)
    dpo = "tests/training/tiny_dpo.yaml"
    assert "set peft.method=lora, or dpo.reference=precomputed" in plan_error(
        *common, "dpo.reference=adapters_off", config=dpo
    )
