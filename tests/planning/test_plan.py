"""danube-plan's model and command, fast: the trainer's FLOPs, only layouts the project's
checks accept, configs the loader reads, refusals with their reason, activations as a layer
saves them on the CPU, the calibration, and the Danube recipe on 8 x H100 against the report."""

import json
import os

import pytest
import torch

from megatron_danube.config.sections import ParallelLayout, PrecisionConfig
from megatron_danube.models.presets import get_preset
from megatron_danube.planning.efficiency import DEFAULT, calibrate
from megatron_danube.planning.hardware import get_gpu
from megatron_danube.planning.layout import PlanLayout
from megatron_danube.planning.memory import Build, layer_activation_bytes
from megatron_danube.planning.search import Request, check, evaluate, run_config, search
from megatron_danube.planning.speed import Cluster
from tests.conftest import REPO

DANUBE = get_preset("danube-1.8b")
REPORT_TOKENS_PER_S = 292_700  # H2O-Danube-1.8B report: 8 x H100, FP8
BAND = (0.75, 1.25)  # the recipe's prediction must lie within +-25% of the report's figure


def request(gpus=8, seq=2048, precision="fp8", gpu="h100", gbt=2**20, model=DANUBE):
    return Request(model, Cluster(get_gpu(gpu), gpus), seq, gbt, precision)


def test_throughput_counts_the_trainers_flops(monkeypatch):
    from megatron_danube.training import metrics

    req = request()
    best = search(req, DEFAULT).ranked[0]
    t = best.time
    flops = t.mfu * 8 * 989e12 / t.tokens_per_s
    assert flops == pytest.approx(metrics.flops_per_token(DANUBE, 2048), rel=1e-9)
    doubled = metrics.flops_per_token
    monkeypatch.setattr(metrics, "flops_per_token", lambda m, s: 2 * doubled(m, s))
    slower = evaluate(req, best.layout, DEFAULT).time
    assert slower.tokens_per_s == pytest.approx(t.tokens_per_s / 2, rel=0.05)


def test_every_layout_passes_the_projects_checks_and_its_config_loads(tmp_path):
    from megatron_danube.config.loader import load_config, save_config
    from megatron_danube.runtime.layout import validate_layout
    from megatron_danube.training.stages import plan_stages

    req = request(gpus=64, seq=4096)
    found = search(req, DEFAULT)
    assert len(found.ranked) > 50 and found.refused
    shapes = set()
    for i, plan in enumerate(found.ranked):
        lay = plan.layout
        assert lay.gpus == 64
        cfg = run_config(req, lay)
        shape = (lay.tp, lay.pp, lay.vpp, lay.distributed_optimizer, lay.recompute)
        if shape not in shapes:  # one YAML round trip per shape (each takes a while)
            shapes.add(shape)
            path = tmp_path / f"{i}.yaml"
            save_config(cfg, str(path))
            cfg = load_config(str(path))
        validate_layout(cfg.parallel, DANUBE, 64, spec="te", seq_length=4096)
        plan_stages(cfg, cfg.parallel.data_parallel(64))
        assert cfg.parallel == lay.parallel()
        assert cfg.train.micro_batch_size == lay.micro_batch
        assert cfg.optim.use_distributed_optimizer == lay.distributed_optimizer
        assert cfg.recompute.granularity == lay.recompute
    assert len(shapes) > 10


def test_the_projects_checks_refuse_what_the_planner_refuses():
    req = request()
    reason = check(req, PlanLayout(3, 1, 1, 1, 1, True, None))
    assert "not divisible by TP(3)" in reason
    reason = check(req, PlanLayout(1, 1, 1, 8, 128, True, None))  # 512 sequences / (128 x 8)
    assert "do not split into micro-batches" in reason
    assert check(req, PlanLayout(1, 4, 2, 2, 32, True, None)) == ""  # 8 micro-batches
    reason = check(req, PlanLayout(1, 4, 2, 2, 128, True, None))  # 2 micro-batches for PP=4
    assert "interleaved schedule needs a multiple of pipeline_parallel 4" in reason


def test_a_layout_that_cannot_fit_is_refused_with_its_reason():
    req = request(gpus=1, seq=16384, gbt=2**20, precision="bf16", gpu="a100-80g")
    plan = evaluate(req, PlanLayout(1, 1, 1, 1, 64, False, None), DEFAULT)
    assert plan.time is None
    assert plan.refused.startswith("does not fit: needs ")
    assert "activations" in plan.refused and "80.0 GiB" in plan.refused
    fits = evaluate(req, PlanLayout(1, 1, 1, 1, 1, True, "full"), DEFAULT)
    assert not fits.refused and fits.memory.required() < get_gpu("a100-80g").memory_bytes


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activations_of_a_layer_are_what_it_saves_on_the_cpu(single_rank, dtype):
    """The local spec's formula against the tensors one layer keeps for its backward
    (saved_tensors_hooks, distinct storages, parameters and the shared RoPE table left out):
    exact. The te formula is an estimate (checked against the H200 peaks in the README)."""
    from megatron_danube.models.builder import build_model_chunks
    from megatron_danube.models.config_builder import build_transformer_config

    model = get_preset("danube-tiny")
    config = build_transformer_config(
        model,
        ParallelLayout(),
        spec="local",
        device_type="cpu",
        precision=PrecisionConfig(params_dtype=dtype),
    )
    chunk = build_model_chunks(model, config, "local", torch.device("cpu"))[0]
    layer = chunk.decoder.layers[0]
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seq, batch = model.sliding_window, 3
    x = torch.randn(seq, batch, model.hidden_size, dtype=config.params_dtype, requires_grad=True)
    rope = chunk.rotary_pos_emb(seq)
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != rope.untyped_storage().data_ptr():
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=rope)
    build = Build(param_bytes=config.params_dtype.itemsize, spec="local")
    assert layer_activation_bytes(model, seq * batch, seq, 1, False, build) == sum(kept.values())


def test_defaults_are_the_fit_of_the_measured_benchmark():
    path = os.path.join(REPO, "docs", "measurements", "2026-12-04-h200-run2.json")
    fitted = calibrate(path)
    for name in ("linear_bf16", "linear_fp8", "attention"):
        assert getattr(fitted, name) == pytest.approx(getattr(DEFAULT, name), abs=5e-4), name


def recipe_tokens_per_s(overrides=()):
    """The Danube recipe (examples/configs/danube-1.8b.yaml) on 8 x H100 at FP8: each stage at
    its best predicted layout, averaged over the recipe's tokens (total tokens / total time)."""
    from megatron_danube.config.loader import load_config

    cfg = load_config(os.path.join(REPO, "examples", "configs", "danube-1.8b.yaml"))
    ends = [s.start_tokens for s in cfg.stages[1:]] + [cfg.train.train_tokens]
    seconds, per_stage = 0.0, {}
    for stage, end in zip(cfg.stages, ends):
        req = request(seq=stage.seq_length, gbt=cfg.train.global_batch_tokens)
        rate = search(req, DEFAULT).ranked[0].time.tokens_per_s
        per_stage[stage.seq_length] = rate
        seconds += (end - stage.start_tokens) / rate
    return cfg.train.train_tokens / seconds, per_stage


def test_danube_recipe_on_8_h100_fp8_is_within_the_band_of_the_report():
    average, per_stage = recipe_tokens_per_s()
    ratio = average / REPORT_TOKENS_PER_S
    assert BAND[0] <= ratio <= BAND[1], (average, per_stage)


def test_command_writes_table_json_and_a_config_the_loader_reads(tmp_path, capsys):
    from megatron_danube.cli.plan import command
    from megatron_danube.config.loader import load_config

    out, cfg_path = tmp_path / "plans.json", tmp_path / "best.yaml"
    argv = ["--model", "danube-1.8b", "--gpu", "h100", "--gpus", "16", "--seq-length", "16384"]
    argv += ["--precision", "fp8", "--top", "3", "--json", str(out)]
    assert command(argv + ["--write-config", str(cfg_path)]) == 0
    table = capsys.readouterr().out
    assert table.count("| TP") == 3
    plans = json.loads(out.read_text())
    rates = [p["tokens_per_s"] for p in plans]
    assert rates == sorted(rates, reverse=True)
    best = plans[0]
    assert set(best["layout"]) == {
        "tp",
        "pp",
        "vpp",
        "dp",
        "micro_batch",
        "distributed_optimizer",
        "recompute",
    }
    parts = best["memory_bytes"]
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    cfg = load_config(str(cfg_path))
    assert cfg.parallel.tensor_parallel == best["layout"]["tp"]
    assert cfg.train.micro_batch_size == best["layout"]["micro_batch"]
    assert cfg.optim.use_distributed_optimizer == best["layout"]["distributed_optimizer"]
    assert cfg.precision.fp8 == "delayed" and cfg.stages[0].seq_length == 16384


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "danube-9b"], "unknown model preset"),
        (["--gpu", "v100"], "--gpu 'v100'"),
        (["--gpu", "a100-80g", "--precision", "fp8"], "needs FP8 hardware"),
        (["--tokens", "lots"], "token count 'lots'"),
        (["--calibrate", "/nonexistent.json"], "not a throughput benchmark JSON"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    from megatron_danube.cli.plan import command

    base = {"--model": "danube-1.8b", "--gpu": "h100", "--gpus": "8", "--seq-length": "2048"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert command([x for kv in base.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("danube-plan: error: ") and message in err and "\n" not in err
