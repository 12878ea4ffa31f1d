"""Two SLURM nodes for real: `two_nodes.sh` brings up slurmctld and two slurmd, each in its own
network namespace with its own address (n1 = SUBNET.11, n2 = SUBNET.12), and the launchers in
`slurm/` run across them at tiny scale on the CPU. The pretraining job is compared with a
one-node torchrun of the same four-rank layout, loss for loss.

What these runs cover: the rendezvous at n1's address (NodeAddr: n1 does not resolve by name
here), gloo reaching the other node's address, ranks from SLURM_PROCID across nodes, the run
directory shared by both, pipeline stages on two nodes (pretraining) and data-parallel replicas
on two nodes (DPO), preemption's signal reaching the ranks of both nodes, a node lost mid-run
(network cut first, then every process in it killed) and the requeued job resuming, twice.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.slurm.test_slurm_launcher import (
    _bin,
    job_field,
    log_of,
    metric_lines,
    pretrain_overrides,
    submit,
    wait_done,
)

SCRIPT = os.path.join(REPO, "tests", "slurm", "two_nodes.sh")
SUBNET = "10.213.78"  # not two_nodes.sh's default, so a cluster started by hand can coexist
N1 = f"{SUBNET}.11"
# SLURM declares a silent node down after this long: above the runs' collective timeout, so
# the ranks' own timeout is what ends them, and SLURM's NODE_FAIL then ends and requeues the job.
SLURMD_TIMEOUT_S = 45
COLLECTIVE_TIMEOUT_MIN = 0.5
REQUEUE_HOLD_S = 20  # SLURM's cred_expire: a requeued job waits this long (120 s by default)

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey", "ip", "nsenter")
missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,  # brings up a cluster and trains on it
    pytest.mark.skipif(
        bool(missing) or os.geteuid() != 0,
        reason=f"two-node SLURM needs root and {', '.join(BINARIES)} (missing {missing}); "
        f"apt-get install slurmctld slurmd slurm-client munge iproute2 util-linux",
    ),
]


def _namespaces_work(prefix):
    probe = f"{prefix}-probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return made.returncode == 0, made.stderr.strip()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    prefix = f"dnbt{os.getpid() % 10000}"
    works, why = _namespaces_work(prefix)
    if not works:
        pytest.skip(f"network namespaces cannot be made here ({why})")
    root = tmp_path_factory.mktemp("two_nodes")
    env = dict(
        os.environ,
        TWO_NODES_SUBNET=SUBNET,
        TWO_NODES_PREFIX=prefix,
        TWO_NODES_SLURMD_TIMEOUT=str(SLURMD_TIMEOUT_S),
        TWO_NODES_CRED_EXPIRE=str(REQUEUE_HOLD_S),
    )
    launch_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    for var in (*launch_vars, "GLOO_SOCKET_IFNAME"):
        env.pop(var, None)  # sbatch exports the caller's environment to the job

    def script(*args):
        return subprocess.run(
            ["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=120
        )

    up = script("up", str(root))
    try:
        assert up.returncode == 0, f"two_nodes.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield {"env": dict(env, SLURM_CONF=str(root / "slurm.conf")), "root": root, "sh": script}
    finally:
        script("down", str(root))


def sbatch(cluster, script, run_dir, config, overrides, run_dir_by="RUN_DIR"):
    """Submit on both nodes; the run directory given as RUN_DIR, or (`run_dir_by="config"`)
    as an override that the script reads back from the config."""
    env = dict(cluster["env"], CONFIG=config)
    if run_dir_by == "RUN_DIR":
        env["RUN_DIR"] = str(run_dir)
    else:
        overrides = [f"run_dir={run_dir}", *overrides]
    return submit(cluster, script, run_dir, overrides, env, nodes=2)


@pytest.fixture
def started():
    """Processes a test starts in the background; those still running at its end are killed
    (their whole process group: torchrun and its ranks)."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_one_node_run(run_dir, config, overrides, started):
    """The same four ranks under torchrun on one host, the reference, started in the background
    (its output to a file, so a full pipe never stalls it); `one_node_losses` waits for it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4"]
    cmd += [f"--master-port={free_port()}", "-m", "megatron_danube.pretrain"]
    cmd += ["--config", os.path.join(REPO, config), f"run_dir={run_dir}", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    output = open(f"{run_dir}.out", "w")
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=dict(env, PYTHONPATH=REPO),
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started.append(proc)
    return proc, output


def one_node_losses(run_dir, reference):
    """The reference's losses, once it has finished."""
    proc, output = reference
    try:
        returncode = proc.wait(timeout=900)
    finally:
        output.close()
    assert returncode == 0, open(f"{run_dir}.out").read()[-4000:]
    return losses(run_dir)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["iteration"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_pp2_across_nodes_preempted_then_a_node_lost_resumes_to_the_one_node_losses(
    cluster, corpus, tmp_path, started
):
    """TP=2 inside a node, PP=2 across the nodes, one job through two interruptions:

    1. USR1 to the batch script (what SLURM sends before the time limit): the ranks of both
       nodes save once, together, and the script requeues the job;
    2. once the requeued job has saved again, n2 is lost (its network cut, then all its
       processes killed): the ranks on n1 stop after the collective timeout with one line,
       SLURM ends the job (NODE_FAIL) and requeues it, the last complete checkpoint is intact;
    3. n2 back, the job resumes from that checkpoint and ends with the one-node run's losses.
    """
    from megatron_danube.training.checkpoint_format import verify_checkpoint

    config = "examples/configs/danube-tiny-cpu.yaml"
    save_interval = 4
    overrides = pretrain_overrides(
        corpus,
        24 * 1024,
        "parallel.tensor_parallel=2",
        "parallel.pipeline_parallel=2",
        f"checkpoint.save_interval={save_interval}",
        f"train.distributed_timeout_minutes={COLLECTIVE_TIMEOUT_MIN}",
    )

    run_dir = tmp_path / "two_nodes"
    latest = run_dir / "checkpoints" / "latest"
    job = sbatch(cluster, "pretrain_1.8b.sh", run_dir, config, overrides)
    wait_for(lambda: metric_lines(run_dir) >= 2, 300, "training to start")
    subprocess.run(
        [_bin("scancel"), "--signal=USR1", "--batch", job], env=cluster["env"], check=True
    )
    wait_for(lambda: job_field(cluster, job, "Restarts") == "1", 300, "the job to be requeued")
    preempted_at = latest.read_text().strip()

    wait_for(
        lambda: latest.read_text().strip() > preempted_at and metric_lines(run_dir) >= 13,
        300,
        "a checkpoint of the requeued job and steps past it",
    )
    lost = cluster["sh"]("kill-node", str(cluster["root"]), "n2")
    died = time.time()
    assert lost.returncode == 0, lost.stderr
    # The reference trains while n1's ranks wait out their timeout and SLURM its own: the
    # cluster's processes are idle then, so the CPU is free (half a minute saved).
    reference = start_one_node_run(tmp_path / "one_node", config, overrides, started)
    trained = metric_lines(run_dir)
    log_path = run_dir / "logs" / f"train-{job}.log"
    wait_for(lambda: "another rank stopped answering" in log_path.read_text(), 300, "a timeout")
    ranks_stopped = time.time() - died
    wait_for(lambda: job_field(cluster, job, "Restarts") == "2", 600, "SLURM to requeue the job")
    job_ended = time.time() - died
    kept = latest.read_text().strip()
    assert verify_checkpoint(str(run_dir / "checkpoints" / kept)) is None
    steps_lost = trained - int(kept.split("_")[1])
    assert 0 <= steps_lost <= save_interval + 1  # +1: a step may end between the two reads

    # n2 back at once; SLURM starts the requeued job REQUEUE_HOLD_S after the requeue (not
    # forced sooner: requests still in flight for the lost run would reach the new one's tasks).
    cluster["sh"]("revive-node", str(cluster["root"]), "n2")
    assert wait_done(cluster, job) == ("COMPLETED", "0:0"), log_of(run_dir, job)[-3000:]

    out = (tmp_path / f"two_nodes-slurm-{job}.out").read_text()
    assert f"2 node(s), 4 tasks, master {N1}:" in out, out  # n1's address, not its name
    log = log_of(run_dir, job)
    assert "Traceback" not in log
    preempted, lost_node, last = log.split("resumed from ")
    # srun delivers the signal node by node: under load one node's ranks may get it after the
    # step boundary where the ranks agree, and they stop with the others all the same.
    reached = re.findall(
        r"saved at a step boundary \(SIGUSR1 reached (\d) of 4 rank\(s\)\)", preempted
    )
    assert len(reached) == 1 and 1 <= int(reached[0]) <= 4, preempted[-3000:]
    assert preempted.count("saved checkpoint") == 1, preempted[-3000:]  # by all ranks at once
    assert lost_node.startswith(f"{run_dir / 'checkpoints' / preempted_at} "), lost_node[:300]
    errors = [ln for ln in lost_node.splitlines() if "another rank stopped answering" in ln]
    assert errors and all(
        f"train.distributed_timeout_minutes={COLLECTIVE_TIMEOUT_MIN:g}" in ln for ln in errors
    )
    assert last.startswith(f"{run_dir / 'checkpoints' / kept} ") and "finished" in last
    assert losses(run_dir) == one_node_losses(tmp_path / "one_node", reference)
    print(
        f"two nodes: ranks stopped {ranks_stopped:.0f} s and the job ended {job_ended:.0f} s "
        f"after the node's loss; {steps_lost} step(s) redone"
    )


def test_finetune_script_runs_dpo_across_two_nodes(cluster, tmp_path):
    """slurm/finetune_1.8b.sh on both nodes: DPO from a Hugging Face start (its reference
    log-probabilities computed before the first step) at TP=2 inside a node and DP=2 across
    the nodes. No RUN_DIR: the script reads run_dir from the config and its overrides."""
    from megatron_danube.data.demo_chat import preference_pairs
    from tests.training.conftest import hf_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_pairs()[0][:6]))
    start = hf_model(tmp_path / "start", seed=0)
    run_dir = tmp_path / "dpo"
    overrides = [f"chat.train=[{pairs}]", f"checkpoint.load={start}", "chat.epochs=1"]
    overrides += ["parallel.tensor_parallel=2", "optim.warmup_tokens=0"]
    job = sbatch(
        cluster,
        "finetune_1.8b.sh",
        run_dir,
        "tests/training/tiny_dpo.yaml",
        overrides,
        run_dir_by="config",
    )
    assert wait_done(cluster, job) == ("COMPLETED", "0:0"), log_of(run_dir, job)[-3000:]
    log = log_of(run_dir, job)
    assert "dpo plan" in log and "DP=2" in log and "finished" in log, log[-3000:]
    assert losses(run_dir)
