"""A LoRA run's checkpoints hold what trains (the adapters and their optimizer state) and name
the frozen base they apply to by the hash of its manifest; every resume, merge or export reads
the base from there and refuses another one.

The manifest lists every file of a checkpoint with its size and CRC, so its hash names the
base's exact bytes without reading them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict

from megatron_danube.errors import DanubeConfigError
from megatron_danube.training.checkpoint_format import resolve_checkpoint
from megatron_danube.training.manifest import MANIFEST_FILE as MANIFEST


def manifest_hash(checkpoint: str) -> str:
    """The hash of a checkpoint's manifest (a one-line error where it has none)."""
    path = os.path.join(checkpoint, MANIFEST)
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        raise DanubeConfigError(
            f"{checkpoint} has no readable {MANIFEST}, which names a LoRA run's base; use a "
            f"checkpoint written by a run or by danube-convert"
        ) from None


def base_record(start: str) -> Dict[str, str]:
    """What a LoRA run's checkpoints record of their base: the checkpoint and its hash."""
    checkpoint = resolve_checkpoint(start, "the LoRA base", verify=False)
    return {"base_checkpoint": checkpoint, "base_manifest": manifest_hash(checkpoint)}


def check_base(recorded: dict, base: str, fix: str) -> str:
    """The base checkpoint `base` resolves to, when it is the one `recorded` names; else a
    one-line error ending in `fix`."""
    expected = recorded.get("base_manifest")
    named = recorded.get("base_checkpoint", "?")
    if not base or not os.path.isdir(base):
        raise DanubeConfigError(
            f"the adapters apply to the base checkpoint {named} (manifest {expected}), and "
            f"{base or 'none'} is not a directory; {fix}"
        )
    checkpoint = resolve_checkpoint(base, "the LoRA base", verify=False)
    found = manifest_hash(checkpoint)
    if expected and found != expected:
        raise DanubeConfigError(
            f"the adapters were trained on the base {named} (manifest {expected}) but {base} "
            f"is another model (manifest {found}); {fix}"
        )
    return checkpoint
