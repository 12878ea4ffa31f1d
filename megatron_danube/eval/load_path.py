"""What can be said of `--load` from its path alone, before megatron-core and torch are imported
(seconds, and on a CUDA build of torch without a GPU, a warning of torch's own)."""

from __future__ import annotations

import os

from megatron_danube.errors import DanubeConfigError


def check_load_path(load: str) -> None:
    """One line where `load` is missing, does not exist or is a Hugging Face model folder."""
    if not load:
        raise DanubeConfigError("no checkpoint given; pass --load RUN_DIR_OR_CHECKPOINT")
    if not os.path.isdir(load):
        raise DanubeConfigError(f"--load {load}: no such directory")
    if os.path.isfile(os.path.join(load, "config.json")) and not os.path.exists(
        os.path.join(load, "train_state.json")
    ):
        raise DanubeConfigError(
            f"--load {load} is a Hugging Face model directory; evaluate it with lm-eval's hf "
            f"model, or convert it with danube-convert --to mcore"
        )
