"""Checkpoints move between megatron-core release lines (0.16 and 0.19), both ways.

Needs a second interpreter whose megatron-core is of another release line than this one's:
`DANUBE_OTHER_PYTHON`, else the first of `.cache/py312/bin/python` (made by
tests/run_mcore_latest.sh), `python3`, `python3.11`, `python3.12` that imports this checkout
with another megatron-core. Skipped, saying so, where there is none.
Select with `pytest -k checkpoint`.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.launch import run_pretrain
from tests.training.conftest import train_losses

pytestmark = pytest.mark.slow  # launches training processes under two interpreters

OTHER_ENV = "DANUBE_OTHER_PYTHON"
PROBE = "from megatron_danube import compat; print(compat.MCORE_VERSION_STRING)"


def mcore_version_of(python: str):
    """The megatron-core version `python` runs this checkout with, or None where it cannot."""
    try:
        proc = subprocess.run(
            [python, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.split()
    return lines[-1] if proc.returncode == 0 and lines else None


def _line(version: str) -> tuple:
    return tuple(version.split(".")[:2])


def _candidates():
    if os.environ.get(OTHER_ENV):
        return [os.environ[OTHER_ENV]]
    found = [os.path.join(REPO, ".cache", "py312", "bin", "python")]
    found += [shutil.which(n) for n in ("python3", "python3.11", "python3.12")]
    return [p for p in found if p and os.path.exists(p)]


@pytest.fixture(scope="module")
def other_python():
    """(path, megatron-core version) of an interpreter with another release line."""
    from megatron_danube import compat

    own = compat.MCORE_VERSION_STRING
    tried = []
    for python in _candidates():
        version = mcore_version_of(python)
        tried.append(f"{python}: {version or 'unusable'}")
        if version and _line(version) != _line(own):
            return python, version
    if os.environ.get(OTHER_ENV):
        pytest.fail(f"{OTHER_ENV}={os.environ[OTHER_ENV]} has no other megatron-core ({tried})")
    pytest.skip(
        f"no second interpreter with a megatron-core other than {own} ({'; '.join(tried)}); "
        f"set {OTHER_ENV} or run tests/run_mcore_latest.sh to make .cache/py312"
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpora):
    """An uninterrupted run under this interpreter: the losses both resumes must give."""
    run_dir = tmp_path_factory.mktemp("xv") / "full"
    run_pretrain(run_dir, corpora)
    return train_losses(run_dir)


def _resume_across(tmp_path, corpora, writer, reader):
    run_dir = tmp_path / "run"
    run_pretrain(run_dir, corpora, "train.exit_after_steps=4", python=writer)
    second = run_pretrain(run_dir, corpora, python=reader)
    assert "resumed from" in second.stdout and "iteration 4" in second.stdout
    return train_losses(run_dir)


def test_checkpoint_of_this_release_resumes_under_the_other(
    tmp_path, corpora, other_python, reference
):
    losses = _resume_across(tmp_path, corpora, sys.executable, other_python[0])
    assert losses == reference  # bitwise: same torch, same math, only megatron differs


def test_checkpoint_of_the_other_release_resumes_under_this_one(
    tmp_path, corpora, other_python, reference
):
    losses = _resume_across(tmp_path, corpora, other_python[0], sys.executable)
    assert losses == reference


def _convert(python, *args):
    proc = subprocess.run(
        [python, "-m", "megatron_danube.cli.convert", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert proc.returncode == 0, f"{python} convert {args}: {proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=8,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("xv-hf") / "tiny"
    MistralForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("direction", ["this-to-other", "other-to-this"])
def test_converted_checkpoint_crosses_releases_bit_identical(
    tmp_path, tiny_hf, other_python, direction
):
    """HF -> mcore under one release, mcore -> HF float32 under the other: the same weights."""
    from safetensors.torch import load_file

    writer, reader = sys.executable, other_python[0]
    if direction == "other-to-this":
        writer, reader = reader, writer
    _convert(writer, "--to", "mcore", "--load", tiny_hf, "--save", tmp_path / "mcore")
    _convert(
        reader, "--to", "hf", "--load", tmp_path / "mcore", "--save", tmp_path / "back",
        "--dtype", "float32",
    )  # fmt: skip
    a = load_file(tiny_hf / "model.safetensors")
    b = load_file(tmp_path / "back" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
