"""Load a converted checkpoint at TP=2 x PP=2 (4 ranks) and compare logits with HF's.

argv: MCORE_DIR INPUT_IDS.pt HF_LOGITS.pt OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_danube.config import ParallelLayout
from megatron_danube.convert.checkpoint_io import model_config_of, read_state
from megatron_danube.models.builder import build_model_chunks
from megatron_danube.models.config_builder import build_transformer_config
from megatron_danube.runtime.distributed import initialize, shutdown
from megatron_danube.training.checkpointing import CheckpointManager


def main(mcore_dir, ids_path, logits_path, out_path):
    model = model_config_of(read_state(mcore_dir))
    layout = ParallelLayout(tensor_parallel=2, pipeline_parallel=2)
    rt = initialize(model, layout, spec="local")
    config = build_transformer_config(model, layout, spec="local", device_type="cpu")
    chunks = build_model_chunks(model, config, "local", rt.device)
    CheckpointManager("/nonexistent").load(mcore_dir, chunks, None, load_optimizer=False)
    ids = torch.load(ids_path, weights_only=True)
    ref = torch.load(logits_path, weights_only=True)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    chunk = chunks[0].eval()
    with torch.no_grad():
        if parallel_state.is_pipeline_first_stage():
            hidden = chunk(ids, pos, None)  # [s, b, h] on the first stage
            dist.send(
                hidden.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank()
            )
            result = None
        else:
            hidden = torch.empty(ids.shape[1], ids.shape[0], model.hidden_size)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            chunk.set_input_tensor(hidden)
            logits = chunk(ids, pos, None)  # [b, s, vocab/TP]
            logits = gather_from_tensor_model_parallel_region(logits)[..., : model.vocab_size]
            result = {
                "max_abs_diff": (logits - ref).abs().max().item(),
                "shape": list(logits.shape),
            }
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump([r for r in results if r], f)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
