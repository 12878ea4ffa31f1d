"""`sbatch slurm/pretrain_1.8b.sh` against a real SLURM (slurmctld + slurmd + munge) on localhost:
a config error, a TERM mid-run then a resubmission, the time limit's USR1 then the requeue.
Training to the end, across nodes, and `finetune_1.8b.sh`: `test_two_nodes.py`.

.ci/run installs Debian's slurmctld, slurmd, slurm-client and munge; the daemons are started
here with a generated slurm.conf and stopped by PID. Select with `pytest -k slurm`.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.conftest import REPO, free_port, wait_for

BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")
missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,  # submits training jobs
    pytest.mark.skipif(
        bool(missing) or os.geteuid() != 0,
        reason=f"local SLURM unavailable (missing {missing} or not root); "
        f"apt-get install slurmctld slurmd slurm-client munge",
    ),
]


# SLURM holds a requeued job back this long (cred_expire; 120 s by default) so that requests
# still in flight for its previous run reach no task of the next. The scheduler looks every 2 s
# (bf_interval, sched_interval below; SLURM's default: every 30 s), so a requeued job starts
# when its hold ends rather than at the next pass.
REQUEUE_HOLD_S = 10


def _bin(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "munge"):
        (root / d).mkdir()
    key = root / "munge" / "munge.key"
    subprocess.run([_bin("mungekey"), "--create", f"--keyfile={key}"], check=True)
    os.chmod(key, 0o600)
    socket = root / "munge" / "munge.sock"
    procs = []
    munged = subprocess.Popen(
        [
            _bin("munged"),
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={socket}",
            f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--seed-file={root / 'munge' / 'seed'}",
            f"--log-file={root / 'munge' / 'munged.log'}",
        ]
    )
    procs.append(munged)
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=danubetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket},cred_expire={REQUEUE_HOLD_S}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
ReturnToService=2
MinJobAge=3600
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "slurmctld.pid"}
SlurmdPidFile={root / "slurmd.pid"}
SlurmctldLogFile={root / "slurmctld.log"}
SlurmdLogFile={root / "slurmd.log"}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName=localhost CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    time.sleep(0.5)
    procs.append(subprocess.Popen([_bin("slurmctld"), "-D", "-f", str(conf)], env=env))
    procs.append(
        subprocess.Popen([_bin("slurmd"), "-D", "-N", "localhost", "-f", str(conf)], env=env)
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(
                [_bin("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True
            ).stdout
            if "idle" in out:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"slurm did not come up: {(root / 'slurmctld.log').read_text()[-2000:]}")
        yield {"env": env, "root": root}
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def pretrain_overrides(corpus, tokens, *more):
    """The tiny CPU demo config on `corpus`, `tokens` long, logging every step."""
    return [
        f"train.train_tokens={tokens}",
        "optim.warmup_tokens=1024",
        f"data.blend=[{corpus}]",
        f"data.demo_corpus_prefix={corpus}",
        "logging.log_interval=1",
        "logging.eval_interval=0",
        *more,
    ]


def submit(slurm, script, run_dir, arguments, env, nodes=1):
    """`sbatch slurm/SCRIPT ARGUMENTS` with 2 CPU tasks per node; the job id."""
    out = subprocess.run(
        [_bin("sbatch"), "--parsable", f"--nodes={nodes}", "--ntasks-per-node=2"]
        + ["--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
        + [f"--output={run_dir}-slurm-%j.out", os.path.join(REPO, "slurm", script), *arguments],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def sbatch(slurm, run_dir, corpus, *overrides, tokens=10240):
    env = {
        k: v
        for k, v in slurm["env"].items()  # sbatch exports the caller's environment
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(CONFIG="examples/configs/danube-tiny-cpu.yaml", RUN_DIR=str(run_dir))
    arguments = pretrain_overrides(corpus, tokens, *overrides)
    return submit(slurm, "pretrain_1.8b.sh", run_dir, arguments, env)


def job_field(slurm, job, field):
    out = subprocess.run(
        [_bin("scontrol"), "show", "job", job], env=slurm["env"], capture_output=True, text=True
    ).stdout
    match = re.search(rf"\b{field}=(\S+)", out)
    return match.group(1) if match else None


def wait_done(slurm, job, timeout=600):
    wait_for(
        lambda: (
            job_field(slurm, job, "JobState")
            in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
        ),
        timeout,
        f"job {job} to end",
    )
    return job_field(slurm, job, "JobState"), job_field(slurm, job, "ExitCode")


def log_of(run_dir, job):
    return (run_dir / "logs" / f"train-{job}.log").read_text()


def metric_lines(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_slurm_config_error_is_one_line_and_exit_2(slurm, corpus, tmp_path):
    """A bad config under sbatch: the job fails with exit code 2 and its log holds the error
    line once (rank 0's), no traceback."""
    run_dir = tmp_path / "run"
    job = sbatch(slurm, run_dir, corpus, "train.micro_batch_sise=3")
    assert wait_done(slurm, job) == ("FAILED", "2:0"), log_of(run_dir, job)[-3000:]
    log = log_of(run_dir, job)
    # (SLURM adds its own "slurmstepd: ... STEP CANCELLED" when it ends the other tasks)
    errors = [ln for ln in log.splitlines() if "error:" in ln and "slurmstepd" not in ln]
    assert len(errors) == 1 and errors[0].endswith(
        "danube-pretrain: error: unknown config key 'train.micro_batch_sise'; "
        "did you mean 'train.micro_batch_size'?"
    ), log[-3000:]
    assert "Traceback" not in log
    assert not (run_dir / "checkpoints").exists()


def test_slurm_scancel_term_saves_exits_cleanly_and_resubmission_resumes(slurm, corpus, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch(slurm, run_dir, corpus, tokens=204800)
    wait_for(lambda: metric_lines(run_dir) >= 4, 300, "training to start")
    subprocess.run([_bin("scancel"), "--signal=TERM", job], env=slurm["env"], check=True)
    assert wait_done(slurm, job) == ("COMPLETED", "0:0")
    assert "signal received: saved at a step boundary" in log_of(run_dir, job)
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 4 <= stopped < 200

    again = sbatch(slurm, run_dir, corpus, "train.exit_after_steps=2", tokens=204800)
    assert wait_done(slurm, again) == ("COMPLETED", "0:0")
    log = log_of(run_dir, again)
    assert f"at iteration {stopped}," in log
    assert f"stopped at iteration {stopped + 2} " in log


def test_slurm_time_limit_signal_saves_requeues_and_finishes(slurm, corpus, tmp_path):
    """USR1 to the batch script (what --signal=B:USR1@300 sends): save, requeue, resume."""
    run_dir = tmp_path / "run"
    job = sbatch(slurm, run_dir, corpus, tokens=20480)
    wait_for(lambda: metric_lines(run_dir) >= 4, 300, "training to start")
    subprocess.run([_bin("scancel"), "--signal=USR1", "--batch", job], env=slurm["env"], check=True)
    wait_for(lambda: job_field(slurm, job, "Restarts") == "1", 300, "the job to be requeued")
    # The requeued job starts by itself after REQUEUE_HOLD_S; forcing it sooner races SLURM's
    # clean-up of the previous run ("Job credential revoked").
    assert wait_done(slurm, job) == ("COMPLETED", "0:0")
    log = log_of(run_dir, job)
    assert "signal received" in log and "resumed from" in log
    assert "stopped at iteration 20 (20,480 tokens): finished" in log
