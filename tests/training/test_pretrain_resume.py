"""The trainer end to end on the CPU: loss falls, resume is exact, signals and kills are safe.

Select with `pytest -k "resume or checkpoint"`.
"""

import json
import os
import shutil
import signal
import time

import psutil
import pytest

from tests.conftest import wait_for
from tests.launch import run_pretrain
from tests.training.conftest import train_losses

pytestmark = pytest.mark.slow  # launches training processes

STEPS = 8


@pytest.fixture(scope="module")
def tp2_runs(tmp_path_factory, corpora):
    """An uninterrupted TP=2 run, and the same run stopped after 4 steps and resumed."""
    root = tmp_path_factory.mktemp("tp2")
    full, split = root / "full", root / "split"
    run_pretrain(full, corpora, "parallel.tensor_parallel=2")
    first = run_pretrain(split, corpora, "parallel.tensor_parallel=2", "train.exit_after_steps=4")
    snapshot = root / "after4"
    shutil.copytree(split, snapshot)  # the state at the stop, for the TP=1 resume
    second = run_pretrain(split, corpora, "parallel.tensor_parallel=2")
    return full, split, snapshot, first, second


def test_loss_falls_on_the_tiny_corpus(tp2_runs):
    losses = train_losses(tp2_runs[0])
    assert len(losses) == STEPS
    assert losses[STEPS] < losses[1] - 0.3, losses


def test_resume_tp2_is_bitwise_identical(tp2_runs):
    full, split, _, first, second = tp2_runs
    assert "exit_after_steps=4" in first.stdout
    assert "resumed from" in second.stdout and "iteration 4" in second.stdout
    a, b = train_losses(full), train_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert a == b  # bitwise: the floats are equal, not close


def test_resume_across_a_stage_boundary_changes_seq_and_blend(tp2_runs):
    full, split, *_ = tp2_runs
    records = [
        json.loads(line) for line in open(os.path.join(split, "metrics.jsonl")) if '"loss"' in line
    ]
    seqs = {r["iteration"]: r["seq_length"] for r in records}
    assert seqs[4] == 32 and seqs[5] == 64  # stopped at 4, resumed into stage 1 at step 5
    assert train_losses(full)[5] == train_losses(split)[5]
    cfg = open(os.path.join(split, "config.yaml")).read()
    assert "0.7" in cfg  # stage 1's blend was in the resolved config


def test_resume_checkpoint_saved_at_tp2_continues_at_tp1(tp2_runs, tmp_path, corpora):
    full, _, snapshot, *_ = tp2_runs
    run_dir = tmp_path / "tp1"
    shutil.copytree(snapshot, run_dir)
    proc = run_pretrain(run_dir, corpora, "parallel.tensor_parallel=1")
    assert "resumed from" in proc.stdout
    a, b = train_losses(full), train_losses(run_dir)
    for it in range(5, STEPS + 1):
        assert abs(a[it] - b[it]) <= 1e-5 * abs(a[it]), (it, a[it], b[it])


def test_resume_pp2_is_bitwise_identical(tmp_path, corpora):
    """Two ranks, one pipeline; across nodes, with DP and TP too, in tests/slurm."""
    layout = ("parallel.pipeline_parallel=2",)
    full, split = tmp_path / "full", tmp_path / "split"
    run_pretrain(full, corpora, *layout)
    run_pretrain(split, corpora, *layout, "train.exit_after_steps=3")
    run_pretrain(split, corpora, *layout)
    assert train_losses(full) == train_losses(split)


def _workers(proc):
    return [
        c
        for c in psutil.Process(proc.pid).children(recursive=True)
        if "megatron_danube.pretrain" in " ".join(c.cmdline())
    ]


def test_checkpoint_on_sigterm_saves_exits_zero_and_resumes(tmp_path, corpora):
    run_dir = tmp_path / "term"
    slow = ("train.train_tokens=25600",)  # 100 steps: long enough to interrupt
    proc = run_pretrain(run_dir, corpora, *slow, background=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
        300,
        "training to start",
    )
    for worker in _workers(proc):  # as srun/scancel --signal=TERM does: every task
        worker.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "signal received" in out
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 3 <= stopped_at < 100
    again = run_pretrain(run_dir, corpora, *slow, "train.exit_after_steps=2")
    assert f"at iteration {stopped_at}," in again.stdout
    assert max(train_losses(run_dir)) == stopped_at + 2
    iterations = [
        json.loads(line)["iteration"]
        for line in metrics.read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert len(iterations) == len(set(iterations)), "a resumed step was recorded twice"


@pytest.mark.parametrize(
    "launcher,expected_rc",
    [
        ("megatron_danube.cli.launch", 0),  # danube-launch: the signal means save and exit 0
        ("torch.distributed.run", 1),  # torchrun itself reports the signal as a failure
    ],
)
def test_sigterm_to_the_launcher_saves(tmp_path, corpora, launcher, expected_rc):
    """SIGTERM to the launcher only (a scheduler or Ctrl-C): every worker saves, nothing is
    left half-written, and the run resumes from the stop."""
    run_dir = tmp_path / "launcher"
    # saves before the signal start megatron's writer helpers, which the signal must not kill
    slow = ("train.train_tokens=25600", "checkpoint.save_interval=2")
    proc = run_pretrain(run_dir, corpora, *slow, background=True, launcher=launcher)
    metrics = run_dir / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
        300,
        "training to start",
    )
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "signal received: saved at a step boundary" in out, out[-3000:]
    assert "BrokenPipeError" not in out
    assert proc.returncode == expected_rc, out[-3000:]
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob("*.partial"))
    stopped_at = int((ckpts / "latest").read_text().strip().split("_")[1])
    again = run_pretrain(run_dir, corpora, *slow, "train.exit_after_steps=1")
    assert f"at iteration {stopped_at}," in again.stdout


def test_a_second_sigterm_to_danube_launch_stops_now_without_a_traceback(tmp_path, corpora):
    run_dir = tmp_path / "twice"
    slow = ("train.train_tokens=25600",)
    proc = run_pretrain(
        run_dir, corpora, *slow, background=True, launcher="megatron_danube.cli.launch"
    )
    metrics = run_dir / "metrics.jsonl"
    wait_for(
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
        300,
        "training to start",
    )
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # two signals sent at once arrive as one; the save takes seconds
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "Traceback" not in out and "SignalException" not in out, out[-3000:]
    assert "SIGTERM received twice: the workers were stopped now" in out, out[-3000:]
    assert proc.returncode == 128 + signal.SIGTERM


def test_checkpoint_killed_mid_save_leaves_previous_latest_loadable(tmp_path, corpora):
    run_dir = tmp_path / "kill"
    ckpts = run_dir / "checkpoints"
    proc = run_pretrain(
        run_dir, corpora, "train.train_tokens=25600", "checkpoint.save_interval=3", background=True
    )

    def saving_after_a_complete_one():
        if not (ckpts / "latest").exists():
            return False
        return any(p.name.endswith(".partial") for p in ckpts.iterdir())

    wait_for(saving_after_a_complete_one, 300, "a second checkpoint save to start")
    # The whole job, mid-save, as SLURM's cgroup kill does (workers run in their own sessions).
    job = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in job:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(job, timeout=60)
    latest = (ckpts / "latest").read_text().strip()
    assert (ckpts / latest / "train_state.json").exists()
    assert any(p.name.endswith(".partial") for p in ckpts.iterdir())  # the killed save
    resumed = run_pretrain(
        run_dir,
        corpora,
        "train.train_tokens=25600",
        "checkpoint.save_interval=3",
        "train.exit_after_steps=1",
    )
    assert f"resumed from {ckpts / latest}" in resumed.stdout


def test_checkpoint_after_nonfinite_losses_stops_the_run(tmp_path, corpora):
    """A diverging run skips non-finite steps, and N in a row stop it with a checkpoint."""
    run_dir = tmp_path / "nan"
    proc = run_pretrain(
        run_dir,
        corpora,
        "optim.lr=1.0e+30",
        "optim.clip_grad=0.0",
        "train.max_bad_steps=2",
        "train.train_tokens=25600",
        nproc=1,
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 skipped steps in a row (last: non-finite loss or gradients)" in proc.stdout
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "train_state.json").exists()
    state = json.loads((run_dir / "checkpoints" / latest / "train_state.json").read_text())
    assert state["skipped_steps"] >= 2 and state["bad_steps_in_row"] == 2
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]  # log_interval 1: one record a step
    skipped = [r for r in steps if r["loss"] != r["loss"] or r["grad_norm"] != r["grad_norm"]]
    assert len(skipped) == state["skipped_steps"]  # a skipped step shows NaN, never 0.0
    assert all(r["loss"] != 0.0 and r["grad_norm"] != 0.0 for r in steps)


def test_steps_over_the_grad_norm_threshold_are_skipped_saved_and_resumable(tmp_path, corpora):
    """megatron-core 0.18+: `optim.grad_norm_skip_threshold` skips the update; the log names
    the norm, N in a row stop the run, and the save works although the optimizer never
    stepped (megatron cannot save an empty distributed-optimizer state by itself)."""
    from megatron_danube import compat

    if compat.MCORE_VERSION < compat.parse_version("0.18"):
        pytest.skip(f"megatron-core {compat.MCORE_VERSION_STRING} has no grad_norm_skip_threshold")
    run_dir = tmp_path / "threshold"
    proc = run_pretrain(
        run_dir,
        corpora,
        "optim.grad_norm_skip_threshold=1e-6",
        "train.max_bad_steps=2",
        nproc=1,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "skipped: grad norm" in out and "above optim.grad_norm_skip_threshold=1e-06" in out
    assert "2 skipped steps in a row (last: grad norm" in out
    assert "Traceback" not in out
    ckpts = run_dir / "checkpoints"
    state = json.loads(
        (ckpts / (ckpts / "latest").read_text().strip() / "train_state.json").read_text()
    )
    assert state["iteration"] == 2 and state["skipped_steps"] == 2
    resumed = run_pretrain(run_dir, corpora, "train.exit_after_steps=2", nproc=1)
    assert "resumed from" in resumed.stdout
    assert "skipped" not in resumed.stdout.split("resumed from", 1)[1]


def test_divergence_never_replaces_healthy_checkpoints(tmp_path, corpora):
    """lr=1e6 after healthy saves: skipped steps are counted, and the healthy checkpoints
    survive pruning; whatever is `latest` afterwards holds finite weights."""
    run_dir = tmp_path / "diverge"
    run_pretrain(
        run_dir,
        corpora,
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=2",
        "train.exit_after_steps=4",
        nproc=1,
    )
    proc = run_pretrain(
        run_dir,
        corpora,
        "optim.lr=1.0e+6",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last=2",
        "train.max_bad_steps=2",
        nproc=1,
        check=False,
    )
    state = json.loads(next((run_dir / "checkpoints").glob("iter_*/train_state.json")).read_text())
    assert state["iteration"] >= 2
    from megatron_danube.convert.checkpoint_io import load_megatron_weights, model_config_of
    from megatron_danube.training.checkpoint_format import read_train_state

    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    weights = load_megatron_weights(str(latest), model_config_of(read_train_state(str(latest))))
    assert all(bool(t.isfinite().all()) for t in weights.values())
    if proc.returncode == 1:
        assert "skipped steps in a row (last: non-finite loss or gradients)" in proc.stdout


def test_resume_from_async_checkpoint_saves(tmp_path, corpora, tp2_runs):
    """async_save: shards are written in the background; `latest` moves once they are done."""
    run_dir = tmp_path / "async"
    opts = (
        "parallel.tensor_parallel=2",
        "checkpoint.async_save=true",
        "checkpoint.save_interval=2",
    )
    run_pretrain(run_dir, corpora, *opts, "train.exit_after_steps=4")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    run_pretrain(run_dir, corpora, *opts)
    assert train_losses(run_dir) == train_losses(tp2_runs[0])


def test_rerunning_a_finished_run_says_so_and_records_nothing_twice(tp2_runs, tmp_path, corpora):
    full = tp2_runs[0]
    run_dir = tmp_path / "finished"
    shutil.copytree(full, run_dir)
    before = open(run_dir / "metrics.jsonl").read()
    checkpoints = sorted(os.listdir(run_dir / "checkpoints"))
    proc = run_pretrain(run_dir, corpora, "parallel.tensor_parallel=2")
    assert "this run finished earlier" in proc.stdout and "choose a new run_dir" in proc.stdout
    assert "final validation" not in proc.stdout
    assert open(run_dir / "metrics.jsonl").read() == before
    assert sorted(os.listdir(run_dir / "checkpoints")) == checkpoints


def test_sigterm_in_the_first_second_is_honoured(tmp_path, corpora):
    """The stop handler is installed before torch loads: a SIGTERM one second after launch
    (long before the imports end) saves at the first step boundary and exits 0."""
    import time

    run_dir = tmp_path / "early"
    proc = run_pretrain(run_dir, corpora, nproc=1, background=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "signal received" in out
