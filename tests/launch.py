"""Every way the tests start the package's commands in other processes, in one place: one
process, torchrun, danube-launch, or another interpreter; in the foreground or background."""

import os
import subprocess
import sys

from megatron_danube.runtime.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = "torch.distributed.run"
DANUBE_LAUNCH = "megatron_danube.cli.launch"


def command(module, nproc=1, launcher=TORCHRUN, python=None):
    """`python -m module`, under `launcher` with `nproc` workers when nproc > 1 (or when the
    launcher is danube-launch, which is tested with any count)."""
    python = python or sys.executable  # another interpreter: the cross-version tests
    if nproc == 1 and launcher == TORCHRUN:
        return [python, "-m", module]
    port = f"--master-port={free_port()}"
    return [python, "-m", launcher, f"--nproc-per-node={nproc}", port, "-m", module]


def launch(
    module,
    *args,
    nproc=1,
    launcher=TORCHRUN,
    python=None,
    timeout=600,
    check=False,
    background=False,
    env=None,
):
    """Run `module` with `args` from the repository root; the CompletedProcess (or, with
    `background`, the Popen with stdout and stderr merged). `check`: fail the test, showing
    the output's end, unless it exits 0."""
    cmd = command(module, nproc, launcher, python) + [str(a) for a in args]
    full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    if background:
        return subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    proc = subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} ({cmd[0]}) failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def run_pretrain(
    run_dir, corpora, *overrides, nproc=2, config="tests/training/tiny_run.yaml", **kwargs
):
    """danube-pretrain on tiny_run.yaml over the test corpora (a blend stage and a mix)."""
    kwargs.setdefault("check", True)
    return launch(
        "megatron_danube.pretrain",
        "--config",
        os.path.join(REPO, config),
        f"run_dir={run_dir}",
        f"data.blend=[{corpora[0]}]",
        f"stages.1.blend=[0.3, {corpora[0]}, 0.7, {corpora[1]}]",
        *overrides,
        nproc=nproc,
        **kwargs,
    )


def run_finetune(run_dir, *overrides, config, nproc=2, **kwargs):
    """danube-finetune on `config` into `run_dir`."""
    kwargs.setdefault("check", True)
    kwargs.setdefault("timeout", 900)
    return launch(
        "megatron_danube.finetune",
        "--config",
        os.path.join(REPO, config),
        f"run_dir={run_dir}",
        *overrides,
        nproc=nproc,
        **kwargs,
    )


def torchrun(script, *args, nproc=2, timeout=900, env=None):
    """A test's worker script under torchrun; the CompletedProcess."""
    cmd = [sys.executable, "-m", TORCHRUN, f"--nproc-per-node={nproc}"]
    cmd += [f"--master-port={free_port()}", script, *map(str, args)]
    full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full_env.update(env or {})
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO
    )
