"""Checkpoint internals in one process: the shared-Adam-step regression, corrupt inputs."""

import os

import pytest
import torch

from megatron_danube.config import CheckpointSection, OptimSection, ParallelLayout
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.builder import build_model_chunks
from megatron_danube.models.config_builder import build_transformer_config
from megatron_danube.models.presets import get_preset
from megatron_danube.training.checkpointing import CheckpointManager
from megatron_danube.training.optim import make_optimizer
from megatron_danube.training.step import causal_lm_batch, train_step, wrap_with_ddp

MODEL = get_preset("danube-test")


def _build(seed, distributed=True, **optim):
    torch.manual_seed(seed)
    config = build_transformer_config(MODEL, ParallelLayout(), spec="local", device_type="cpu")
    chunks = wrap_with_ddp(
        build_model_chunks(MODEL, config, "local", torch.device("cpu")),
        config,
        use_distributed_optimizer=distributed,
    )
    section = OptimSection(lr=1e-2, use_distributed_optimizer=distributed, **optim)
    return chunks, make_optimizer(section, chunks, config)


def _batch(step):
    g = torch.Generator().manual_seed(step)
    t = torch.randint(0, MODEL.vocab_size, (2, 17), generator=g)
    return [iter([causal_lm_batch(t)])]


def _step(chunks, opt, step):
    return train_step(
        chunks, opt, _batch(step), num_microbatches=1, seq_length=16, micro_batch_size=2
    )


def _adam_steps(opt):
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt
    return (
        [s["step"] for s in inner.optimizer.state.values()]
        if hasattr(inner, "optimizer")
        else [s["step"] for s in inner.state.values()]
    )


def test_checkpoint_shared_adam_step_regression(single_rank, tmp_path):
    """After loading a distributed-optimizer checkpoint, each param has its own Adam step.

    megatron 0.16 gives all params one shared `step` tensor when torch's Adam is used (no
    TE/apex); it then advances once per parameter per step and bias correction goes wrong.
    """
    chunks, opt = _build(0)
    for step in range(2):
        _step(chunks, opt, step)
    manager = CheckpointManager(str(tmp_path), CheckpointSection(keep_last=2))
    manager.save(2, chunks, opt, {"iteration": 2, "consumed_tokens": 64})

    fresh_chunks, fresh_opt = _build(99)  # different init: everything must come from the file
    manager.load(manager.latest(), fresh_chunks, fresh_opt)
    steps = _adam_steps(fresh_opt)
    assert len(steps) > 3
    assert len({id(s) for s in steps}) == len(steps), "step tensors are shared"
    assert all(s.item() == 2 for s in steps)

    a = _step(chunks, opt, 2)
    b = _step(fresh_chunks, fresh_opt, 2)
    assert a["loss"] == b["loss"]
    assert all(s.item() == 3 for s in _adam_steps(fresh_opt))
    for p, q in zip(chunks[0].parameters(), fresh_chunks[0].parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "distributed, optim",
    [(True, {}), (False, {}), (False, {"optimizer": "sgd", "sgd_momentum": 0.9})],
    ids=["distributed-adam", "adam", "sgd-momentum"],
)
def test_a_save_before_any_optimizer_step_resumes_exactly(
    single_rank, tmp_path, distributed, optim
):
    """Every step so far skipped (non-finite, or over grad_norm_skip_threshold), then a save:
    the optimizer has no state yet. The save must work, leave the weights alone, and a resume
    from it must train exactly as the run that never stopped."""
    chunks, opt = _build(0, distributed, **optim)
    before = [p.detach().clone() for p in chunks[0].parameters()]
    manager = CheckpointManager(str(tmp_path))
    path = manager.save(0, chunks, opt, {"iteration": 0, "consumed_tokens": 0})
    assert path is not None
    for p, q in zip(chunks[0].parameters(), before):
        assert torch.equal(p, q)

    fresh_chunks, fresh_opt = _build(99, distributed, **optim)
    manager.load(path, fresh_chunks, fresh_opt)
    for step in range(2):
        a, b = _step(chunks, opt, step), _step(fresh_chunks, fresh_opt, step)
        assert not a["skipped"] and a["loss"] == b["loss"]
    for p, q in zip(chunks[0].parameters(), fresh_chunks[0].parameters()):
        assert torch.equal(p, q)
    if not optim:
        assert all(s.item() == 2 for s in _adam_steps(fresh_opt))


def test_checkpoint_latest_pointing_at_missing_folder_is_a_clear_error(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "latest").write_text("iter_0000042\n")
    with pytest.raises(
        DanubeConfigError, match="names iter_0000042, which is missing or incomplete"
    ):
        CheckpointManager(str(tmp_path)).latest()


def test_checkpoint_corrupt_shard_is_a_clear_error(single_rank, tmp_path):
    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    manager = CheckpointManager(str(tmp_path))
    path = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    shards = [f for f in os.listdir(path) if f.endswith(".distcp")]
    assert shards
    for f in shards:
        with open(os.path.join(path, f), "r+b") as fh:
            fh.truncate(64)
    fresh_chunks, fresh_opt = _build(1)
    with pytest.raises(DanubeConfigError, match="cannot load checkpoint"):
        manager.load(path, fresh_chunks, fresh_opt)


def test_verify_false_reads_a_start_whose_manifest_disagrees(single_rank, tmp_path):
    """checkpoint.verify=false skips the CRC check of checkpoint.load too (the user's call,
    e.g. for a checkpoint copied without its manifest being rewritten)."""
    import json

    from megatron_danube.training.checkpoint_format import resolve_checkpoint

    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    path = CheckpointManager(str(tmp_path)).save(1, chunks, opt, {"iteration": 1})
    manifest = os.path.join(path, "manifest.json")
    data = json.load(open(manifest))
    entry = next(iter(data["files"].values()))
    entry["crc32"] = "00000000" if entry["crc32"] != "00000000" else "00000001"
    json.dump(data, open(manifest, "w"))
    with pytest.raises(DanubeConfigError, match="is damaged"):
        resolve_checkpoint(str(tmp_path), "checkpoint.load")
    assert resolve_checkpoint(str(tmp_path), "checkpoint.load", verify=False) == path
    assert resolve_checkpoint(path, "checkpoint.load", verify=False) == path


def test_checkpoint_keep_last_prunes_old_ones(single_rank, tmp_path):
    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    manager = CheckpointManager(str(tmp_path), CheckpointSection(keep_last=2))
    for it in (1, 2, 3):
        manager.save(it, chunks, opt, {"iteration": it, "consumed_tokens": 32 * it})
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["iter_0000002", "iter_0000003", "latest"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000003"


def test_weights_with_nan_are_never_saved_and_nothing_is_pruned(single_rank, tmp_path):
    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    manager = CheckpointManager(str(tmp_path), CheckpointSection(keep_last=1))
    good = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    with torch.no_grad():
        next(chunks[0].parameters()).view(-1)[0] = float("nan")
    assert manager.save(2, chunks, opt, {"iteration": 2, "consumed_tokens": 64}) is None
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001", "latest"]
    assert manager.latest() == good


def _flip_a_byte(path):
    shard = sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]
    with open(os.path.join(path, shard), "r+b") as f:
        f.seek(os.path.getsize(os.path.join(path, shard)) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    return shard


def test_damaged_latest_falls_back_to_the_newest_intact_checkpoint(single_rank, tmp_path, caplog):
    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    manager = CheckpointManager(str(tmp_path), CheckpointSection(keep_last=3))
    first = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    second = manager.save(2, chunks, opt, {"iteration": 2, "consumed_tokens": 64})
    assert manager.latest() == second
    shard = _flip_a_byte(second)
    with caplog.at_level("WARNING"):
        assert manager.latest() == first
    assert f"{shard} does not match its checksum" in caplog.text
    _flip_a_byte(first)
    with pytest.raises(DanubeConfigError, match="no intact checkpoint"):
        manager.latest()
    # the check can be turned off for a deliberate load of damaged data
    assert CheckpointManager(str(tmp_path), CheckpointSection(verify=False)).latest() == second


def test_manifest_lists_every_file_with_size_and_checksum(single_rank, tmp_path):
    from megatron_danube.training import manifest

    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    path = CheckpointManager(str(tmp_path)).save(1, chunks, opt, {"iteration": 1})
    entries = manifest.read_manifest(path)
    assert set(entries) == set(manifest.list_files(path)) and "train_state.json" in entries
    assert all(e["size"] == os.path.getsize(os.path.join(path, n)) for n, e in entries.items())
    (tmp_path / "checkpoints" / "iter_0000001" / "stray.bin").write_bytes(b"x")
    assert "stray.bin is not in the manifest" in manifest.verify_folder(path)


def test_a_save_that_cannot_fit_is_refused_before_writing(single_rank, tmp_path, monkeypatch):
    import shutil as shutil_module

    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    manager = CheckpointManager(str(tmp_path))
    first = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    usage = shutil_module.disk_usage(str(tmp_path))
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(DanubeConfigError, match="not enough disk space to save iteration 2"):
        manager.save(2, chunks, opt, {"iteration": 2, "consumed_tokens": 64})
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001", "latest"]
    assert manager.latest() == first


def test_a_failed_write_leaves_no_partial_and_keeps_latest(single_rank, tmp_path, monkeypatch):
    import errno

    from megatron.core import dist_checkpointing

    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    manager = CheckpointManager(str(tmp_path))
    first = manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dist_checkpointing, "save", disk_full)
    with pytest.raises(DanubeConfigError, match="No space left on device") as e:
        manager.save(2, chunks, opt, {"iteration": 2, "consumed_tokens": 64})
    assert "\n" not in str(e.value) and "the previous checkpoint is intact" in str(e.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["iter_0000001", "latest"]
    assert manager.latest() == first


def test_a_synchronous_save_starts_no_helper_process(single_rank, tmp_path):
    """megatron's writer would spawn a helper process for its results queue (which imports
    torch to unpickle them) at the first save; a synchronous save collects them in this
    process."""
    import queue

    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    chunks, opt = _build(0)
    _step(chunks, opt, 0)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    manager = CheckpointManager(str(tmp_path), CheckpointSection())
    manager.save(1, chunks, opt, {"iteration": 1, "consumed_tokens": 32})
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not started, [psutil.Process(pid).cmdline() for pid in started]
    assert isinstance(filesystem_async._results_queue, queue.Queue)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "iter_0000001"


RESULTS_QUEUE_SWITCH = """
import queue
from megatron.core.dist_checkpointing.strategies import filesystem_async as fs
from megatron_danube.training.checkpoint_writer import prepare_results_queue
if __name__ == "__main__":
    prepare_results_queue(async_saves=False)
    assert isinstance(fs._results_queue, queue.Queue)
    prepare_results_queue(async_saves=True)  # after a synchronous save: the helper now
    helper = fs._results_queue
    assert not isinstance(helper, queue.Queue), helper
    helper.put(1)
    assert helper.get() == 1
    prepare_results_queue(async_saves=False)  # the helper, once running, stays
    assert fs._results_queue is helper
    print("ok")
"""


def test_async_saves_after_a_synchronous_one_get_the_helper(tmp_path):
    """(In its own process: the queue is a module global of megatron's.)"""
    import subprocess
    import sys

    script = tmp_path / "switch.py"
    script.write_text(RESULTS_QUEUE_SWITCH)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
