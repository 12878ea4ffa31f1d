"""A checkpoint loaded forward-only at any layout, for evaluation.

`check_checkpoint` does what needs no process group (the checkpoint exists and records its
model, the tokenizer loads, the layout fits), so bad input is one line before anything
expensive; `load_checkpoint` then starts megatron's groups, builds the model with the
trainer's own build (`model_build.build_model`) and reads the weights with the trainer's own
loader (`CheckpointManager.load`, weights only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.eval.load_path import check_load_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedCheckpoint:
    """What `check_checkpoint` found: enough to load without further questions."""

    path: str
    """The iter_* folder to read."""
    model: object
    """Its DanubeModelConfig."""
    tokenizer: object
    """The tokenizer to evaluate with (by default the one the run trained with)."""
    layout: tuple
    """`check_layout`'s answer for this launch."""
    iteration: int
    lora: Optional[dict] = None
    """A LoRA run's record (its adapters are in `path`), with `base_checkpoint` checked."""


@dataclass
class LoadedModel:
    """Model chunks of this rank in eval mode, with what evaluation needs to know of them."""

    chunks: List[torch.nn.Module]
    model: object
    tokenizer: object
    runtime: object
    checkpoint: str
    iteration: int


def checkpoint_tokenizer(spec: Optional[str], tokenizer_type: Optional[str], override):
    """`override` (a path or name) or else the tokenizer the checkpoint records."""
    from megatron_danube.data.tokenizer import load_tokenizer

    if override:
        return load_tokenizer(override)
    if not spec:
        raise DanubeConfigError("the checkpoint records no tokenizer; pass --tokenizer PATH")
    try:
        return load_tokenizer(spec, tokenizer_type)
    except DanubeConfigError as exc:
        raise DanubeConfigError(
            f"the run's tokenizer {spec!r} cannot be loaded here ({exc}); pass --tokenizer PATH"
        ) from None


def check_checkpoint(load: str, cfg: RunConfig, tokenizer: Optional[str] = None):
    """The checked checkpoint behind `load` (a run directory or a checkpoint) at the layout
    of `cfg.parallel`; one-line errors, no process group needed."""
    from megatron_danube.models.presets import DanubeModelConfig
    from megatron_danube.runtime.distributed import check_layout
    from megatron_danube.training.checkpoint_format import read_train_state, resolve_checkpoint

    check_load_path(load)
    path = resolve_checkpoint(load, "--load", verify=False)  # checksums: once loaded, shared
    state = read_train_state(path)
    lora = state.get("lora")
    if lora:  # evaluated as it trained: its base, then its adapters on top
        if cfg.model.spec != "local":
            raise DanubeConfigError(
                f"{path} is a LoRA run, which runs on the local layer spec; add model.spec=local"
            )
        if lora.get("base_manifest"):
            from megatron_danube.training.lora_checkpoints import check_base

            base = check_base(
                lora,
                lora.get("base_checkpoint"),
                "restore it, or evaluate a merged export (danube-convert --to hf --merge-lora)",
            )
            lora = dict(lora, base_checkpoint=base)
    if "model" not in state:
        raise DanubeConfigError(f"{path} does not record its model; it cannot be evaluated")
    model = DanubeModelConfig(**state["model"])
    tok = checkpoint_tokenizer(state.get("tokenizer"), state.get("tokenizer_type"), tokenizer)
    if tok.vocab_size > model.vocab_size:
        raise DanubeConfigError(
            f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model {model.vocab_size}"
        )
    layout = check_layout(
        model,
        cfg.parallel,
        spec=cfg.model.spec,
        device=cfg.train.device,
        seq_length=model.max_position_embeddings,
        fp8=cfg.precision.fp8,
    )
    return CheckedCheckpoint(path, model, tok, layout, int(state["iteration"]), lora or None)


def _with_adapters(checked: CheckedCheckpoint):
    """The pre-wrap hook that gives the model a LoRA run's adapters (values: the checkpoint's)."""
    from megatron_danube.models.lora import LoraSettings, apply_lora

    return lambda chunks: apply_lora(chunks, checked.model, LoraSettings.of(checked.lora))


def load_checkpoint(checked: CheckedCheckpoint, cfg: RunConfig) -> LoadedModel:
    """Start the process group, build the model at the layout, read the weights."""
    from megatron_danube.runtime.distributed import initialize
    from megatron_danube.training.checkpointing import CheckpointManager
    from megatron_danube.training.model_build import build_model

    rt = initialize(
        checked.model,
        cfg.parallel,
        seed=cfg.train.seed,
        spec=cfg.model.spec,
        device=cfg.train.device,
        seq_length=checked.model.max_position_embeddings,
        timeout_minutes=cfg.train.distributed_timeout_minutes,
        rendezvous_timeout_s=cfg.train.rendezvous_timeout_s,
        checked=checked.layout,
    )
    _, chunks = build_model(
        checked.model,
        layout=cfg.parallel,
        spec=rt.spec,
        device=rt.device,
        precision=cfg.precision,
        overrides={"perform_initialization": False},  # every weight comes from the checkpoint
        pre_wrap=[] if checked.lora is None else [_with_adapters(checked)],
    )
    manager = CheckpointManager(os.path.dirname(checked.path), cfg.checkpoint)
    if checked.lora and checked.lora.get("base_checkpoint"):  # adapters only: the base first
        from megatron_danube.models.lora import is_adapter_name

        base = checked.lora["base_checkpoint"]
        manager.load(base, chunks, None, load_optimizer=False, verify=True, absent=is_adapter_name)
        manager.load(
            checked.path,
            chunks,
            None,
            load_optimizer=False,
            verify=True,
            absent=lambda name: not is_adapter_name(name),
        )
    else:
        manager.load(checked.path, chunks, None, load_optimizer=False, verify=True)
    for chunk in chunks:
        chunk.eval()
    logger.info(
        "loaded %s (iteration %d) at TP=%d PP=%d DP=%d, spec=%s, device=%s",
        checked.path,
        checked.iteration,
        cfg.parallel.tensor_parallel,
        cfg.parallel.pipeline_parallel,
        rt.data_parallel,
        rt.spec,
        rt.device.type,
    )
    return LoadedModel(
        chunks, checked.model, checked.tokenizer, rt, checked.path, checked.iteration
    )
