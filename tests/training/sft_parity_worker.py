"""Packed chat fine-tuning against the same conversations one at a time, on 2 ranks.

Reference (TP=1, PP=1, in every process): each conversation alone through GPTModel as an
ordinary causal sequence; sum of its masked token losses; backward; gradients summed over
conversations, then divided by the number of supervised tokens (the global per-token mean).

Cases: the same conversations packed into rows (THD, document bounds) and run through the
trainer's path (the SFT job's forward step and TransformerConfig settings, megatron DDP,
pipeline schedules, `finalize_model_grads`) in several layouts and micro-batchings; loss and
gradients must match the reference. A negative control packs without document bounds and must
not match. Results go to a JSON file that test_sft_parity.py asserts on.
"""

from __future__ import annotations

import json
import sys
import traceback

from megatron_danube.logs import setup_logging

setup_logging()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_danube.config import ParallelLayout  # noqa: E402
from megatron_danube.data.chat.dataset import ChatSamples  # noqa: E402
from megatron_danube.data.chat.packing import epoch_packs, packed_microbatch  # noqa: E402
from megatron_danube.models.builder import build_model_chunks  # noqa: E402
from megatron_danube.models.config_builder import build_transformer_config  # noqa: E402
from megatron_danube.models.full_weights import (  # noqa: E402
    full_named_parameters,
    load_full_weights,
)
from megatron_danube.models.presets import get_preset  # noqa: E402
from megatron_danube.runtime.distributed import initialize  # noqa: E402
from megatron_danube.training.jobs.sft import SFTJob  # noqa: E402
from megatron_danube.training.step import forward_backward, wrap_with_ddp  # noqa: E402
from tests.parallel.parity_worker import relative_errors  # noqa: E402

MODEL = get_preset("danube-test")  # sliding window 8: shorter than most conversations
SEQ = 48  # tokens per packed row
ROWS = 8  # rows per global batch
PAD = 0


def conversations() -> ChatSamples:
    """Random conversations (lengths 5-30) with prompt/answer-like masks, enough for ROWS packs."""
    rng = np.random.default_rng(7)
    tokens, labels, masks, lengths = [], [], [], []
    while True:
        n = int(rng.integers(5, 31))
        ids = rng.integers(1, MODEL.vocab_size, n + 1).astype(np.int32)
        answer_from = int(rng.integers(1, n))
        mask = np.zeros(n, dtype=np.uint8)
        mask[answer_from - 1 :] = 1  # the last prompt position predicts the first answer token
        mask[rng.random(n) < 0.15] = 0  # and a few holes, as multi-turn has
        tokens.append(ids[:-1])
        labels.append(ids[1:])
        masks.append(mask)
        lengths.append(n)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        samples = ChatSamples(
            np.concatenate(tokens), np.concatenate(labels), np.concatenate(masks), offsets, {}
        )
        packs = epoch_packs(samples.lengths, SEQ, epochs=1, seed=1, packing="bfd", shuffle=False)
        if len(packs) > ROWS:
            used = [i for p in packs[:ROWS] for i in p]
            return samples.subset(np.array(used))


def setup(layout: ParallelLayout):
    rt = initialize(MODEL, layout, seed=1234, spec="local")
    config = build_transformer_config(
        MODEL, layout, spec=rt.spec, device_type=rt.device.type, **SFTJob.transformer_overrides
    )
    return rt, config, build_model_chunks(MODEL, config, rt.spec, rt.device)


def reference(samples: ChatSamples):
    """(loss sum, supervised tokens, full weights, full gradients / supervised tokens)."""
    _, _, chunks = setup(ParallelLayout())
    model = chunks[0]
    total, count = 0.0, 0
    for i in range(len(samples)):
        tokens, labels, mask = (torch.from_numpy(a.astype(np.int64)) for a in samples.sample(i))
        n = len(tokens)
        per_token = model(
            tokens.unsqueeze(0), torch.arange(n).unsqueeze(0), None, labels=labels.unsqueeze(0)
        )
        loss = (per_token.view(-1).float() * mask.float()).sum()
        loss.backward()
        total += loss.item()
        count += int(mask.sum())
    weights = full_named_parameters(model)
    grads = {name: p.grad.detach() / count for name, p in _named(model)}
    return total, count, weights, grads


def _named(model):
    from megatron_danube.models.full_weights import _global_names

    return [(name, p) for _, name, p in _global_names(model)]


def packed_iterators(samples, mbs: int, dp_rank: int, dp_size: int, documents: bool):
    packs = epoch_packs(samples.lengths, SEQ, epochs=1, seed=1, packing="bfd", shuffle=False)
    assert len(packs) == ROWS, len(packs)
    per_rank = ROWS // dp_size
    mine = packs[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    micro = [
        packed_microbatch(samples, mine[i : i + mbs], SEQ, PAD) for i in range(0, per_rank, mbs)
    ]
    if not documents:  # negative control: one document per row, conversations see each other
        for batch in micro:
            t = batch["tokens"].shape[1]
            batch["cu_seqlens"] = torch.tensor([0, t], dtype=torch.int32)
            batch["max_seqlen"] = t
    return micro


def run_case(layout: ParallelLayout, samples, full, mbs: int, documents: bool = True):
    rt, config, chunks = setup(layout)
    load_full_weights(chunks, full)
    ddp = wrap_with_ddp(chunks, config, use_distributed_optimizer=False)
    for chunk in ddp:
        chunk.zero_grad_buffer()
    micro = packed_iterators(
        samples,
        mbs,
        parallel_state.get_data_parallel_rank(),
        parallel_state.get_data_parallel_world_size(),
        documents,
    )
    totals = forward_backward(
        ddp,
        [iter(list(micro)) for _ in ddp],
        num_microbatches=len(micro),
        seq_length=mbs * SEQ,
        micro_batch_size=1,
        forward_step_func=SFTJob.forward_step,
    )
    return ddp, totals["lm loss"]


CASES = {
    # name: (layout, micro-batch size, document bounds)
    "tp1_dp2": (ParallelLayout(), 1, True),
    "tp2_sp_mbs1x8": (ParallelLayout(tensor_parallel=2, sequence_parallel=True), 1, True),
    "tp2_sp_mbs2x4": (ParallelLayout(tensor_parallel=2, sequence_parallel=True), 2, True),
    "pp2_mbs1x8": (ParallelLayout(pipeline_parallel=2), 1, True),
    "pp2_mbs2x4": (ParallelLayout(pipeline_parallel=2), 2, True),
    "control_no_document_bounds": (ParallelLayout(tensor_parallel=2), 1, False),
}


def main(out_path: str) -> None:
    samples = conversations()
    ref_loss, ref_count, full, ref_grads = reference(samples)
    results = {
        "reference": {"loss_sum": ref_loss, "supervised": ref_count, "samples": len(samples)}
    }
    for name, (layout, mbs, documents) in CASES.items():
        try:
            ddp, report = run_case(layout, samples, full, mbs, documents)
            grad_rel, where = relative_errors(ddp, ref_grads, "grad")
            results[name] = {
                "loss_sum": report[0].item(),
                "supervised": report[1].item(),
                "loss_rel": abs(report[0].item() - ref_loss) / abs(ref_loss),
                "grad_rel": grad_rel,
                "worst": where,
            }
        except Exception as exc:  # reported per case; that case's test fails
            results[name] = {"error": "".join(traceback.format_exception(exc))[-3000:]}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
    from megatron_danube.runtime.distributed import shutdown

    shutdown()
