"""Reading megatron_danube checkpoints outside training: resolve, verify, load full tensors.

Every model tensor is read at full size in one CPU process whatever TP/PP/DP or spec wrote
it: the checkpoint's stored keys are global and spec-independent.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_danube import compat
from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.config_builder import DTYPES
from megatron_danube.training.checkpoint_format import (  # noqa: F401  (resolve_checkpoint: re-export)
    read_train_state,
    resolve_checkpoint,
)

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def init_single_rank(model_cfg) -> None:
    """One gloo rank in this process (dist_checkpointing needs a process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_danube.config import ParallelLayout
    from megatron_danube.runtime.distributed import initialize, initialize_single_process

    if parallel_state.model_parallel_is_initialized() and (
        parallel_state.get_tensor_model_parallel_world_size() == 1
        and parallel_state.get_pipeline_model_parallel_world_size() == 1
    ):
        return
    if dist.is_initialized():  # a caller's process group: only megatron's groups are made
        initialize(model_cfg, ParallelLayout(), spec="local", device="cpu")
    else:
        initialize_single_process(model_cfg)


read_state = read_train_state


def model_config_of(state: dict, preset: Optional[str] = None):
    from megatron_danube.models.presets import DanubeModelConfig, get_preset

    if preset:
        return get_preset(preset)
    if "model" not in state:
        raise DanubeConfigError(
            "the checkpoint does not record its model; pass --model-preset NAME"
        )
    return DanubeModelConfig(**state["model"])


def load_megatron_weights(
    ckpt: str, model_cfg, *, lora_base: Optional[str] = None, with_base: bool = True
) -> Dict[str, torch.Tensor]:
    """Every model tensor of a distributed checkpoint at full size, per-layer names. A LoRA
    run's checkpoint holds its adapters only: the base's tensors come from the base it names
    (or `lora_base`, which must be the same model), unless `with_base` is false."""
    from megatron_danube.models.hf_adapter import check_mcore_shapes
    from megatron_danube.models.lora import is_adapter_name

    weights = _read_model_tensors(ckpt, model_cfg)
    recorded = (read_train_state(ckpt).get("lora") or {}) if with_base else {}
    if recorded.get("base_manifest"):
        from megatron_danube.training.lora_checkpoints import check_base

        base = check_base(
            recorded,
            lora_base or recorded.get("base_checkpoint"),
            "pass the base checkpoint it was trained on with --lora-base",
        )
        weights.update(_read_model_tensors(base, model_cfg))
    if with_base:  # LoRA adapters (if any) are checked on use
        check_mcore_shapes(
            {k: v for k, v in weights.items() if not is_adapter_name(k)}, model_cfg, ckpt
        )
    return weights


def _read_model_tensors(ckpt: str, model_cfg) -> Dict[str, torch.Tensor]:
    """The model tensors a checkpoint stores, at full size, per-layer names."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_danube.models.hf_adapter import unstack_layers

    init_single_rank(model_cfg)
    compat.check_readable(ckpt)
    try:
        metadata = dist_checkpointing.load_tensors_metadata(ckpt)
    except Exception as exc:
        raise DanubeConfigError(
            f"{ckpt}: cannot read checkpoint metadata ({type(exc).__name__})"
        ) from None
    request = {}
    for key, meta in metadata.items():
        model_key = key[len("module.") :] if key.startswith("module.") else key
        if not model_key.startswith(MODEL_PREFIXES) or not isinstance(meta, ShardedTensor):
            continue  # optimizer state, RNG, TE extra state
        tensor = torch.empty(meta.global_shape, dtype=meta.dtype)
        request[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
    if not request:
        raise DanubeConfigError(f"{ckpt}: the checkpoint holds no model tensors")
    try:
        loaded = dist_checkpointing.load(request, ckpt)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise DanubeConfigError(
            f"{ckpt}: checkpoint data is corrupt or incomplete ({type(exc).__name__})"
        ) from None
    # `load` also returns the checkpoint's common (non-sharded) state: keep the tensors asked for.
    weights = {
        k[len("module.") :] if k.startswith("module.") else k: v
        for k, v in loaded.items()
        if k in request
    }
    return unstack_layers(weights, model_cfg.num_layers)


def build_local_model(model_cfg, dtype: torch.dtype, lora: Optional[dict] = None):
    """The whole model on this CPU process, without DDP or optimizer (forward-only work);
    with a LoRA run's record (`lora`), its adapters in place to load."""
    from megatron_danube.config import ParallelLayout, PrecisionConfig
    from megatron_danube.models.lora import LoraSettings, apply_lora
    from megatron_danube.training.model_build import build_model

    init_single_rank(model_cfg)
    name = {v: k for k, v in DTYPES.items()}[dtype]
    _, chunks = build_model(
        model_cfg,
        layout=ParallelLayout(),
        spec="local",
        device=torch.device("cpu"),
        precision=PrecisionConfig(params_dtype=name),
        overrides={"perform_initialization": False},
        pre_wrap=[]
        if lora is None
        else [lambda c: apply_lora(c, model_cfg, LoraSettings.of(lora))],
    )
    return chunks[0]
