"""What the trainer's own build allocates on each rank, for the planner's memory test.

Run by `torchrun --nproc-per-node 4`: for every preset, layout and optimizer sharding, build
the model with `model_build.build_model` + `wrap_for_training` (the trainer's path), take one
optimizer step so the optimizer state exists, and count the bytes of the distinct storages
behind the parameters, the DDP gradient buffers and the optimizer's own tensors. Rank 0 writes
{case: [per-rank record]} as JSON.
"""

from __future__ import annotations

import json
import sys

from megatron_danube.logs import setup_logging

setup_logging()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_danube.config import OptimSection, ParallelLayout  # noqa: E402
from megatron_danube.models.presets import get_preset  # noqa: E402
from megatron_danube.runtime.distributed import initialize  # noqa: E402
from megatron_danube.training.model_build import build_model, wrap_for_training  # noqa: E402
from megatron_danube.training.step import causal_lm_batch, train_step  # noqa: E402

SEQ = 16
MICRO_BATCHES = 2
LAYOUTS = {
    "tp2": ParallelLayout(tensor_parallel=2, sequence_parallel=True),
    "pp2": ParallelLayout(pipeline_parallel=2),
    "pp2_vpp2": ParallelLayout(pipeline_parallel=2, virtual_pipeline=2),
    "tp2_pp2": ParallelLayout(tensor_parallel=2, pipeline_parallel=2, sequence_parallel=True),
    "dp4": ParallelLayout(),
}
PRESETS = ("danube-tiny", "danube-test")


def storages(tensors):
    """{data_ptr: nbytes} of the distinct storages behind `tensors`."""
    out = {}
    for t in tensors:
        st = t.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
    return out


def torch_optimizers(optimizer):
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o.optimizer for o in inner]


def measure(chunks, optimizer) -> dict:
    params = [p for chunk in chunks for p in chunk.parameters()]
    weights = storages(params)
    grads = storages(p.main_grad for p in params if hasattr(p, "main_grad"))
    held, counters = {}, {}
    for opt in torch_optimizers(optimizer):
        tensors = [p for g in opt.param_groups for p in g["params"]]
        for state in opt.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v)]
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr in weights or ptr in grads:
                continue  # a view of the model's parameters or gradient buffer
            (counters if t.dim() == 0 else held)[ptr] = t.untyped_storage().nbytes()
    return {
        "weights": sum(weights.values()),
        "gradients": sum(grads.values()),
        "optimizer_state": sum(held.values()),
        "optimizer_counters": sum(counters.values()),
    }


def one_step(model, chunks, optimizer):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (MICRO_BATCHES, SEQ + 1), generator=g)
    batches = [causal_lm_batch(tokens[i : i + 1]) for i in range(MICRO_BATCHES)]
    iters = [iter(list(batches)) for _ in chunks]
    train_step(
        chunks,
        optimizer,
        iters,
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=1,
    )


def run_case(preset: str, layout: ParallelLayout, distributed: bool) -> dict:
    model = get_preset(preset)
    rt = initialize(model, layout, spec="local", device="cpu")
    config, chunks = build_model(model, layout=layout, spec=rt.spec, device=rt.device)
    optim = OptimSection(lr=1e-3, use_distributed_optimizer=distributed)
    trainable = wrap_for_training(config, chunks, optim, total_tokens=1024)
    one_step(model, trainable.chunks, trainable.optimizer)
    record = measure(trainable.chunks, trainable.optimizer)
    record.update(
        rank=dist.get_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp=parallel_state.get_data_parallel_world_size(),
    )
    return record


def main(out_path: str) -> None:
    results = {}
    for preset in PRESETS:
        for name, layout in LAYOUTS.items():
            for distributed in (False, True):
                record = run_case(preset, layout, distributed)
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, record)
                results[f"{preset}/{name}/{'distopt' if distributed else 'plain'}"] = gathered
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    from megatron_danube.runtime.distributed import shutdown

    shutdown()
