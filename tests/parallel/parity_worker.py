"""Layout-parity cases, run by `torchrun --nproc-per-node 4` once for the whole test module.

For every case the same master weights (a TP=1/PP=1 model's, sharded into the layout) see the
same global batch; loss and gradients (or parameters after 3 optimizer steps) are compared with
the TP=1/PP=1 reference computed in the same process. Results go to a JSON file that
tests/parallel/test_parity.py asserts on.
"""

from __future__ import annotations

import json
import sys
import traceback

from megatron_danube.logs import setup_logging

setup_logging()  # known warnings filtered by message and module, as in the trainer

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_danube.config import OptimSection, ParallelLayout  # noqa: E402
from megatron_danube.models.builder import build_model_chunks  # noqa: E402
from megatron_danube.models.config_builder import build_transformer_config  # noqa: E402
from megatron_danube.models.full_weights import (  # noqa: E402
    full_named_parameters,
    load_full_weights,
    local_slices,
)
from megatron_danube.models.lora import LoraSettings, apply_lora, resolve_targets  # noqa: E402
from megatron_danube.models.presets import get_preset  # noqa: E402
from megatron_danube.runtime.distributed import initialize  # noqa: E402
from megatron_danube.training.optim import make_optimizer  # noqa: E402
from megatron_danube.training.step import (  # noqa: E402
    causal_lm_batch,
    forward_backward,
    train_step,
    wrap_with_ddp,
)

MODEL = get_preset("danube-test")
SEQ = 32  # > the preset's window of 8: the sliding window is exercised
GLOBAL_BATCH = 8
MICRO_BATCH = 1
OPT_STEPS = 3


def global_batches(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, MODEL.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens


def data_iterators(step: int, dp_rank: int, dp_size: int, num_chunks: int):
    seqs = global_batches(step)
    per_rank = GLOBAL_BATCH // dp_size
    mine = seqs[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    micro = []
    for i in range(0, per_rank, MICRO_BATCH):
        chunk = mine[i : i + MICRO_BATCH]
        micro.append(causal_lm_batch(chunk))
    return [iter(list(micro)) for _ in range(num_chunks)], len(micro)


LORA = LoraSettings(
    rank=4,
    alpha=16,
    dropout=0.0,
    targets=resolve_targets(["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]),
)


def setup(layout: ParallelLayout, lora: bool = False):
    rt = initialize(MODEL, layout, seed=1234, spec="local")
    config = build_transformer_config(MODEL, layout, spec=rt.spec, device_type=rt.device.type)
    chunks = build_model_chunks(MODEL, config, rt.spec, rt.device)
    if lora:  # adapters on every projection, B random so that they change the output
        apply_lora(chunks, MODEL, LORA)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in chunks[0].named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return rt, config, chunks


def wrap(config, chunks, distributed_optimizer, with_optimizer):
    ddp = wrap_with_ddp(chunks, config, use_distributed_optimizer=distributed_optimizer)
    optimizer = None
    if with_optimizer:
        optim = OptimSection(lr=1e-3, use_distributed_optimizer=distributed_optimizer)
        optimizer = make_optimizer(optim, ddp, config)
    return ddp, optimizer


def run(
    layout,
    full_weights,
    *,
    reference,
    distributed_optimizer=False,
    steps=0,
    gated=True,
    lora=False,
):
    """Return (losses per step, local (name, param or grad, ref-able tensor) after the run)."""
    rt, config, chunks = setup(layout, lora)
    if full_weights is not None:
        load_full_weights(chunks, full_weights, gated=gated)
    ddp, optimizer = wrap(config, chunks, distributed_optimizer, steps > 0)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if reference:  # every rank computes the whole batch itself
        dp_rank, dp_size = 0, 1
    losses = []
    for step in range(max(steps, 1)):
        iters, n_micro = data_iterators(step, dp_rank, dp_size, len(ddp))
        kwargs = dict(num_microbatches=n_micro, seq_length=SEQ, micro_batch_size=MICRO_BATCH)
        if steps == 0:
            for chunk in ddp:
                chunk.zero_grad_buffer()
            totals = forward_backward(ddp, iters, **kwargs)
            losses.append((totals["lm loss"][0] / totals["lm loss"][1]).item())
        else:
            losses.append(train_step(ddp, optimizer, iters, **kwargs)["loss"])
    return rt, chunks, losses


def relative_errors(chunks, full_reference, attr: str, gated=True):
    """Max over parameters of ||local - ref slice|| / ||ref slice||, reduced over all ranks."""
    worst, worst_name = 0.0, ""
    compared = 0
    for name, param, ref_slice in local_slices(chunks, full_reference, gated, partial=True):
        compared += 1
        local = param.main_grad if attr == "grad" else param.detach()
        err = (local.float() - ref_slice.float()).norm() / ref_slice.float().norm().clamp(min=1e-30)
        if err.item() > worst:
            worst, worst_name = err.item(), name
    if not compared:
        raise AssertionError("no parameter of this rank was compared")
    t = torch.tensor([worst], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item(), worst_name


CASES = {
    # name: (layout, options)
    "tp2": (ParallelLayout(tensor_parallel=2), {}),
    "tp2_sp": (ParallelLayout(tensor_parallel=2, sequence_parallel=True), {}),
    "pp2": (ParallelLayout(pipeline_parallel=2), {}),
    "pp2_vpp2": (ParallelLayout(pipeline_parallel=2, virtual_pipeline=2), {}),
    "tp2_pp2": (ParallelLayout(tensor_parallel=2, pipeline_parallel=2), {}),
    "dp2_tp2_distopt": (ParallelLayout(tensor_parallel=2), {"steps": OPT_STEPS, "distopt": True}),
    "dp4_distopt": (ParallelLayout(), {"steps": OPT_STEPS, "distopt": True}),
    # LoRA adapters (the base frozen): adapter gradients at every layout equal the reference's.
    "lora_tp2_sp": (ParallelLayout(tensor_parallel=2, sequence_parallel=True), {"lora": True}),
    "lora_pp2": (ParallelLayout(pipeline_parallel=2), {"lora": True}),
    "lora_tp2_pp2": (ParallelLayout(tensor_parallel=2, pipeline_parallel=2), {"lora": True}),
    # Negative control: fc1 split naively across TP (gate/up halves mixed). Must be caught.
    "control_wrong_fc1_split": (ParallelLayout(tensor_parallel=2), {"gated": False}),
}


def main(out_path: str, selected: list) -> None:
    results = {}
    # Reference 1: gradients of one step. Reference 2: 3 optimizer steps.
    rt, ref_chunks, ref_losses = run(ParallelLayout(), None, reference=True)
    full = full_named_parameters(ref_chunks[0])
    ref_grads = {n: p.main_grad.detach().clone() for n, p, _ in local_slices(ref_chunks, full)}
    _, ref_opt_chunks, ref_opt_losses = run(ParallelLayout(), full, reference=True, steps=OPT_STEPS)
    ref_params_after = full_named_parameters(ref_opt_chunks[0])
    # Reference 3: LoRA on the same base, gradients of one step (adapters only).
    _, lora_chunks, lora_losses = run(ParallelLayout(), None, reference=True, lora=True)
    lora_full = full_named_parameters(lora_chunks[0])
    lora_full.update({k: v for k, v in full.items() if k in lora_full})
    _, lora_chunks, lora_losses = run(ParallelLayout(), lora_full, reference=True, lora=True)
    lora_grads = {
        n: p.main_grad.detach().clone()
        for n, p, _ in local_slices(lora_chunks, lora_full)
        if p.requires_grad
    }

    for name in selected:
        layout, opts = CASES[name]
        try:
            steps, lora = opts.get("steps", 0), opts.get("lora", False)
            rt, chunks, losses = run(
                layout,
                lora_full if lora else full,
                reference=False,
                distributed_optimizer=opts.get("distopt", False),
                steps=steps,
                gated=opts.get("gated", True),
                lora=lora,
            )
            expected = ref_opt_losses if steps else (lora_losses if lora else ref_losses)
            loss_rel = max(abs(a - b) / abs(b) for a, b in zip(losses, expected))
            if steps:
                err, where = relative_errors(chunks, ref_params_after, "param")
            else:
                err, where = relative_errors(
                    chunks, lora_grads if lora else ref_grads, "grad", gated=opts.get("gated", True)
                )
            results[name] = {
                "losses": losses,
                "reference_losses": expected,
                "loss_rel": loss_rel,
                "tensor_rel": err,
                "compared": f"params after {steps} steps" if steps else "grads",
                "worst": where,
            }
        except Exception as exc:  # reported per case; the test for that case fails
            results[name] = {"error": "".join(traceback.format_exception(exc))[-3000:]}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    out = sys.argv[1]
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES)
    main(out, names)
    from megatron_danube.runtime.distributed import shutdown

    shutdown()
