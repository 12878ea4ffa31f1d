"""compat.py: the version -> behaviour mapping, checked against the installed release.

The table tests pin the mapping for each supported release line; the `installed_*` tests fail
when the installed megatron-core does not behave as its flags say (a new release moved
something, or the mapping was edited wrongly).
"""

import dataclasses
import inspect
import json
import logging
import math
from importlib import metadata

import pytest
import torch

from megatron_danube import compat
from megatron_danube.config import CheckpointSection, OptimSection, ParallelLayout
from megatron_danube.config.loader import from_dict, to_dict
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.builder import build_model_chunks
from megatron_danube.models.config_builder import build_transformer_config
from megatron_danube.models.presets import get_preset
from megatron_danube.training.checkpointing import CheckpointManager
from megatron_danube.training.optim import make_optimizer
from megatron_danube.training.step import causal_lm_batch, train_step, wrap_with_ddp

MODEL = get_preset("danube-test")


@pytest.mark.parametrize(
    "text, version",
    [
        ("0.16.1", (0, 16, 1)),
        ("0.19.2", (0, 19, 2)),
        ("0.17.0rc1", (0, 17, 0)),
        ("0.20.0.dev0+abc123", (0, 20, 0)),
        ("0.18", (0, 18, 0)),
    ],
)
def test_parse_version(text, version):
    assert compat.parse_version(text) == version


def test_unreadable_version_is_one_line():
    with pytest.raises(DanubeConfigError, match="cannot read megatron-core version") as e:
        compat.parse_version("main")
    assert "\n" not in str(e.value)


# release -> (async_strategy, writer helper, common state in shards, grad sync stream)
MAPPING = {
    (0, 16, 1): (None, "_get_write_results_queue", False, False),
    (0, 17, 1): ("mcore", "get_write_results_queue", False, False),
    (0, 18, 2): ("mcore", "get_write_results_queue", False, False),
    (0, 19, 0): ("mcore", "get_write_results_queue", True, True),
    (0, 19, 2): ("mcore", "get_write_results_queue", True, True),
}


@pytest.mark.parametrize("version", sorted(MAPPING))
def test_feature_table(version):
    f = compat.features_for(version)
    got = (
        f.save_async_strategy,
        f.writer_queue_helper,
        f.common_state_in_shards,
        f.grad_sync_uses_cuda_stream,
    )
    assert got == MAPPING[version]
    assert f.reads_common_file is not f.common_state_in_shards


def test_supported_range():
    assert compat.support_problem((0, 16, 1)) is None
    assert compat.support_problem((0, 19, 2)) is None
    problem = compat.support_problem((0, 15, 3))
    assert "0.15.3 is older" in problem and compat.PIN in problem
    with pytest.raises(DanubeConfigError, match="older than this package supports"):
        compat.check_supported((0, 16, 0))


def test_newer_release_is_warned_of_not_refused(caplog):
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        assert compat.support_problem((0, 20, 0)) is None
    assert "newer than the releases this package is tested with" in caplog.text


def test_installed_release_is_read_and_supported():
    assert compat.MCORE_VERSION == compat.parse_version(metadata.version("megatron-core"))
    assert compat.FEATURES == compat.features_for(compat.MCORE_VERSION)
    assert compat.OLDEST <= compat.MCORE_VERSION
    assert compat.MCORE_VERSION[:2] <= compat.NEWEST_MINOR, (
        "megatron-core is newer than the mapping knows: check what moved, extend features_for"
    )


def test_installed_save_takes_the_async_strategy_the_flag_says():
    from megatron.core import dist_checkpointing

    params = inspect.signature(dist_checkpointing.save).parameters
    assert ("async_strategy" in params) == (compat.FEATURES.save_async_strategy is not None)


def test_installed_writer_queue_helper_exists():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert callable(getattr(filesystem_async, compat.FEATURES.writer_queue_helper, None))


def test_installed_group_matching_keys_are_covered():
    """Every key megatron matches saved optimizer groups by is structural or aligned."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    covered = set(compat.STRUCTURAL_GROUP_KEYS) | set(compat._schedule_keys())
    assert set(param_group_identifier_keys) <= covered
    assert set(compat.STRUCTURAL_GROUP_KEYS) <= set(param_group_identifier_keys)


def _ddp_and_optimizer(lr):
    torch.manual_seed(0)
    config = build_transformer_config(MODEL, ParallelLayout(), spec="local", device_type="cpu")
    chunks = wrap_with_ddp(
        build_model_chunks(MODEL, config, "local", torch.device("cpu")),
        config,
        use_distributed_optimizer=True,
    )
    return chunks, make_optimizer(OptimSection(lr=lr), chunks, config)


def _one_step(chunks, opt):
    t = torch.randint(0, MODEL.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    return train_step(
        chunks,
        opt,
        [iter([causal_lm_batch(t)])],
        num_microbatches=1,
        seq_length=16,
        micro_batch_size=2,
    )


def test_installed_grad_sync_stream_use_matches_the_flag(single_rank, monkeypatch):
    """With megatron's real torch.cuda, the grad sync fails on the CPU exactly when flagged."""
    from megatron.core.distributed import param_and_grad_buffer

    chunks, _ = _ddp_and_optimizer(1e-3)
    monkeypatch.setattr(param_and_grad_buffer.torch, "cuda", torch.cuda)
    try:
        chunks[0].start_grad_sync()
        chunks[0].finish_grad_sync()
        failed = False
    except (RuntimeError, AssertionError):  # no driver (CUDA build) / not compiled (CPU build)
        failed = True
    assert failed == compat.FEATURES.grad_sync_uses_cuda_stream
    monkeypatch.undo()
    chunks[0].finish_grad_sync()  # and with cpu_compat's torch.cuda it works


def test_saves_are_readable_by_every_supported_release(single_rank, tmp_path):
    """common.pt is written where this release keeps the common state in the shards."""
    chunks, opt = _ddp_and_optimizer(1e-3)
    _one_step(chunks, opt)
    manager = CheckpointManager(str(tmp_path), CheckpointSection())
    path = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    assert (tmp_path / "checkpoints" / "iter_0000001" / compat.LEGACY_COMMON_FILE).is_file()
    state = json.loads((tmp_path / "checkpoints" / "iter_0000001" / "train_state.json").read_text())
    assert state["megatron_core"] == compat.MCORE_VERSION_STRING
    manager.load(path, *_ddp_and_optimizer(1e-3))


def test_resume_takes_this_runs_learning_rate(single_rank, tmp_path):
    """A changed optim.lr applies after a resume, on every release (0.19 failed, 0.16 kept the
    checkpoint's value silently)."""
    chunks, opt = _ddp_and_optimizer(1e-3)
    _one_step(chunks, opt)
    manager = CheckpointManager(str(tmp_path), CheckpointSection())
    path = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    fresh_chunks, fresh_opt = _ddp_and_optimizer(5e-2)
    manager.load(path, fresh_chunks, fresh_opt)
    groups = fresh_opt.chained_optimizers[0].optimizer.param_groups
    assert {g["max_lr"] for g in groups} == {5e-2}


class _Inner:
    def __init__(self, groups):
        self.param_groups = groups


class _Opt:
    def __init__(self, groups):
        self.optimizer = _Inner(groups)


def _group(wd_mult, max_lr, **extra):
    return dict(
        wd_mult=wd_mult,
        lr_mult=1.0,
        is_expert_parallel=False,
        is_decoupled_lr=False,
        max_lr=max_lr,
        min_lr=max_lr / 10,
        **extra,
    )


def test_align_param_groups_copies_schedule_values_by_structure():
    current = [_group(1.0, 0.5), _group(0.0, 0.5)]
    saved = {"optimizer": {"param_groups": [_group(0.0, 0.1, params=[0]), _group(1.0, 0.1)]}}
    compat.align_param_groups(_Opt(current), saved)
    groups = saved["optimizer"]["param_groups"]
    assert [(g["wd_mult"], g["max_lr"], g["min_lr"]) for g in groups] == [
        (0.0, 0.5, 0.05),
        (1.0, 0.5, 0.05),
    ]
    assert groups[0]["params"] == [0]


def test_align_param_groups_without_a_match_is_one_line():
    saved = {"param_groups": [_group(1.0, 0.1)]}
    with pytest.raises(DanubeConfigError, match="checkpoint.load_optimizer=false") as e:
        compat.align_param_groups(_Opt([_group(0.5, 0.1)]), saved)
    assert "\n" not in str(e.value)


def _features(**changes):
    return dataclasses.replace(compat.FEATURES, **changes)


def test_a_checkpoint_this_release_cannot_read_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    monkeypatch.setattr(compat, "FEATURES", _features(reads_common_file=True))
    monkeypatch.setattr(compat, "MCORE_VERSION_STRING", "0.16.1")
    with pytest.raises(DanubeConfigError) as e:
        compat.check_readable(str(tmp_path), {"megatron_core": "0.19.2"})
    message = str(e.value)
    assert "megatron-core 0.19.2" in message and "megatron-core 0.16.1" in message
    assert "\n" not in message
    (tmp_path / compat.LEGACY_COMMON_FILE).write_bytes(b"")
    compat.check_readable(str(tmp_path), {})
    monkeypatch.setattr(compat, "FEATURES", _features(reads_common_file=False))
    (tmp_path / compat.LEGACY_COMMON_FILE).unlink()
    compat.check_readable(str(tmp_path), {})


@dataclasses.dataclass
class _WithInfiniteDefault:
    threshold: float = math.inf
    lr: float = 1.0


def test_config_keeps_an_infinite_default_and_refuses_other_infinities():
    """megatron 0.18+ defaults grad_norm_skip_threshold to inf: defaults must round-trip."""
    assert from_dict(_WithInfiniteDefault, to_dict(_WithInfiniteDefault())).threshold == math.inf
    with pytest.raises(DanubeConfigError, match="lr: expected a finite number"):
        from_dict(_WithInfiniteDefault, {"lr": math.inf})
    with pytest.raises(DanubeConfigError, match="threshold: expected a finite number"):
        from_dict(_WithInfiniteDefault, {"threshold": -math.inf})
