"""What Transformer Engine can do on this GPU, and which attention kernel it picked.

FP8 GEMMs need compute capability 8.9 (Ada, Hopper); MXFP8's block scaling needs 10.0
(Blackwell). Refusing a recipe here, before any model or data is built, replaces a failure
deep inside TE's first forward pass.

TE picks its attention backend per call shape (flash-attn, cuDNN fused attention, or its
unfused O(s^2) PyTorch path) and records the last choice; `attention_backend()` reads it so
the run can say which kernel its sliding window and packed documents actually use.
"""

from __future__ import annotations

from typing import Optional, Tuple

from megatron_danube.errors import DanubeConfigError

# Minimum compute capability per FP8 recipe (megatron's `fp8_recipe` names).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "mxfp8": (10, 0)}

# transformer_engine's NVTE_Fused_Attn_Backend values.
_FUSED_SUB_BACKENDS = {0: "F16_max512_seqlen", 1: "F16_arbitrary_seqlen", 2: "FP8"}


def fp8_problem(recipe: Optional[str], capability: Optional[Tuple[int, int]]) -> Optional[str]:
    """Why `precision.fp8=recipe` cannot run on a GPU of `capability`, or None if it can."""
    if recipe is None:
        return None
    if recipe not in FP8_MIN_CAPABILITY:
        return f"precision.fp8={recipe!r}; choose one of {sorted(FP8_MIN_CAPABILITY)} or null"
    if capability is None:
        return None  # no GPU: the spec check reports that
    need = FP8_MIN_CAPABILITY[recipe]
    if tuple(capability) >= need:
        return None
    have = f"sm_{capability[0]}{capability[1]}"
    if recipe == "mxfp8":
        usable = [r for r, c in FP8_MIN_CAPABILITY.items() if tuple(capability) >= c]
        hint = f"use precision.fp8={usable[0]}" if usable else "unset precision.fp8"
        return (
            f"precision.fp8=mxfp8 needs a Blackwell GPU (sm_100), this one is {have}; "
            f"{hint} (Hopper runs delayed and tensorwise)"
        )
    return (
        f"precision.fp8={recipe} needs FP8 tensor cores (sm_89 or newer), this GPU is {have}; "
        f"unset precision.fp8 to train in bf16"
    )


def check_fp8(fp8: Optional[str], spec: str, device_type: str) -> None:
    """An FP8 recipe this run's spec and GPU can execute, or a one-line error."""
    if fp8 is None:
        return
    if spec != "te":
        raise DanubeConfigError(
            f"precision.fp8={fp8!r} needs Transformer Engine (model.spec=te on a GPU with "
            f"transformer_engine installed); this run resolved model.spec={spec}: "
            f"unset precision.fp8"
        )
    problem = fp8_problem(fp8, gpu_capability() if device_type == "cuda" else None)
    if problem:
        raise DanubeConfigError(problem)


def gpu_capability() -> Optional[Tuple[int, int]]:
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def attention_backend() -> Optional[str]:
    """The attention backend TE chose for its most recent attention call, in words.

    None when TE is not installed or has not run attention yet in this process.
    """
    try:
        from transformer_engine.pytorch.attention.dot_product_attention import (
            _attention_backends as chosen,
        )
    except ImportError:
        return None
    if chosen.get("attention_params") is None:
        return None
    if chosen.get("use_flash_attention"):
        return f"flash-attn {chosen.get('flash_attention_backend')}"
    if chosen.get("use_fused_attention"):
        sub = chosen.get("fused_attention_backend")
        sub_value = int(sub) if sub is not None else -1
        return f"cuDNN fused attention ({_FUSED_SUB_BACKENDS.get(sub_value, sub_value)})"
    if chosen.get("use_unfused_attention"):
        return "TE unfused attention (PyTorch, O(s^2) memory)"
    return "none"


def log_attention_backend(logger) -> None:
    """Say which attention kernel TE runs; warn where it is the unfused O(s^2) fallback."""
    backend = attention_backend()
    if backend is None:
        return
    if backend.startswith("TE unfused"):
        logger.warning(
            "Transformer Engine runs attention on its unfused path (%s): no flash-attn and no "
            "cuDNN fused kernel accepted this shape/window; long sequences will be slow and "
            "memory-bound",
            backend,
        )
    else:
        logger.info("Transformer Engine attention backend: %s", backend)
