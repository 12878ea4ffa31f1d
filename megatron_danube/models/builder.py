"""Build the GPTModel chunks this rank owns (one per virtual-pipeline stage)."""

from __future__ import annotations

from typing import List

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_danube.models.config_builder import gpt_model_kwargs
from megatron_danube.models.layer_specs import decoder_spec
from megatron_danube.models.presets import DanubeModelConfig


def build_model_chunks(
    model: DanubeModelConfig, config: TransformerConfig, spec: str, device: torch.device
) -> List[GPTModel]:
    """One GPTModel per virtual stage of this pipeline rank, on `device`."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = list(range(vpp)) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=decoder_spec(spec, config, vp_stage),
            pre_process=parallel_state.is_pipeline_first_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            post_process=parallel_state.is_pipeline_last_stage(
                ignore_virtual=False, vp_stage=vp_stage
            ),
            vp_stage=vp_stage,
            **gpt_model_kwargs(model),
        )
        chunks.append(chunk.to(device))
    return chunks


def count_parameters(chunks: List[torch.nn.Module]) -> int:
    return sum(p.numel() for chunk in chunks for p in chunk.parameters())
