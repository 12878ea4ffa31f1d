"""One training or evaluation step through megatron-core's pipeline schedules.

Shared by the trainer, the benchmarks and the parity tests, so all of them exercise the same
path: megatron DDP, `get_forward_backward_func`, `finalize_model_grads`, megatron optimizer.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import TransformerConfig


def wrap_with_ddp(
    chunks: List[torch.nn.Module],
    config: TransformerConfig,
    *,
    use_distributed_optimizer: bool,
    overlap_grad_reduce: bool = False,
) -> List[DistributedDataParallel]:
    """Megatron DDP around each chunk, and the config hooks the schedules call."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk's buckets are overlapped with compute (megatron's convention).
            disable_bucketing=(i > 0),
        )
        for i, chunk in enumerate(chunks)
    ]
    config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [m.no_sync for m in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        sync = [m.start_grad_sync for m in wrapped]
        config.grad_sync_func = sync[0] if len(sync) == 1 else sync
    return wrapped


LM_REPORTS = {"lm loss": 2}  # [sum of token losses, token count]


def _masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of token losses and the token count: megatron divides by the count and microbatches."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(per_token_loss.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def causal_lm_batch(ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    """`lm_forward_step`'s batch from [b, s + 1] token ids: predict each next token, all
    positions trained on (benchmarks, tests, fixed-data checks)."""
    batch, seq = ids.shape[0], ids.shape[1] - 1
    return {
        "tokens": ids[:, :-1],
        "labels": ids[:, 1:],
        "loss_mask": torch.ones(batch, seq, device=ids.device),
        "position_ids": torch.arange(seq, device=ids.device).expand(batch, seq),
    }


def lm_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Megatron forward-step function for next-token prediction on GPTModel.

    Each batch is a dict with `tokens`, `labels`, `loss_mask`, `position_ids` ([b, s] tensors).
    Pipeline stages that consume no data still draw from the iterator to stay in step.
    """
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels)
    return output, partial(_masked_token_loss, loss_mask)


def packed_forward_step(data_iterator: Iterator, model: torch.nn.Module):
    """Megatron forward-step function for packed documents (THD), e.g. chat fine-tuning.

    Each batch is one [1, t] row of several documents with `cu_seqlens` bounds; every pipeline
    stage draws it, so every stage's attention and RoPE see the document bounds.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    batch = next(data_iterator)
    device = next(model.parameters()).device
    cu_seqlens = batch["cu_seqlens"].to(device, non_blocking=True)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=batch["max_seqlen"],
        max_seqlen_kv=batch["max_seqlen"],
    )
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    output = model(tokens, position_ids, None, labels=labels, packed_seq_params=params)
    return output, partial(_masked_token_loss, loss_mask)


def lm_loss(reports: Dict[str, torch.Tensor]) -> float:
    """Mean token loss from summed `lm loss` reports."""
    total = reports["lm loss"]
    return (total[0] / total[1].clamp(min=1)).item()


def forward_backward(
    chunks: List[torch.nn.Module],
    data_iterators: List[Iterator],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
    forward_step_func: Callable = lm_forward_step,
    report_sizes: Optional[Dict[str, int]] = None,
) -> Dict[str, torch.Tensor]:
    """Run the schedule; return each report summed over microbatches and DP ranks.

    `report_sizes` names the loss function's reports and their lengths (the last pipeline
    stage produces them; the others need the shapes to take part in the reduction). The
    result is valid on every rank (shared from the last pipeline stage).
    """
    report_sizes = report_sizes or LM_REPORTS
    fwd_bwd = get_forward_backward_func()
    results = fwd_bwd(
        forward_step_func=forward_step_func,
        data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    device = next(chunks[0].parameters()).device
    keys = sorted(report_sizes)
    totals = torch.zeros(sum(report_sizes.values()), dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in results:
            totals += torch.cat([item[k].to(torch.float64).view(-1) for k in keys])
    # Sum over DP x CP (each saw different tokens), then share from the last PP stage.
    dist.all_reduce(
        totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
    )
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return dict(zip(keys, totals.split([report_sizes[k] for k in keys])))


def zero_grads(chunks: List[DistributedDataParallel], optimizer=None) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()


def grads_are_finite(chunks: List[DistributedDataParallel]) -> bool:
    """Whether every gradient on every rank is finite (one all-reduce over the world).

    Megatron's bf16/fp32 optimizers step on NaN gradients without a word; checking the grad
    buffers after the reduction catches a NaN from any rank, micro-batch or pipeline stage.
    """
    from megatron_danube.runtime.distributed import all_ranks_agree

    device = next(chunks[0].parameters()).device
    ok = torch.ones((), dtype=torch.bool, device=device)
    for chunk in chunks:
        for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", []):
            ok &= torch.isfinite(buffer.grad_data).all()  # stays on the device: no sync here
    return all_ranks_agree(ok, device)


def train_step(
    chunks: List[DistributedDataParallel],
    optimizer,
    data_iterators: List[Iterator],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step_func: Callable = lm_forward_step,
    report_sizes: Optional[Dict[str, int]] = None,
    loss_of: Callable[[Dict[str, torch.Tensor]], float] = lm_loss,
) -> Dict[str, object]:
    """Forward, backward, optimizer step; the step is skipped when loss or gradients are not
    finite. Returns loss, grad norm, whether the step was skipped, and the summed reports."""
    zero_grads(chunks, optimizer)
    reports = forward_backward(
        chunks,
        data_iterators,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_step_func=forward_step_func,
        report_sizes=report_sizes,
    )
    loss = loss_of(reports)
    result = {"loss": loss, "grad_norm": float("nan"), "skipped": False, "reports": reports}
    if optimizer is None:
        return result
    if not math.isfinite(loss) or not grads_are_finite(chunks):
        result["skipped"] = True  # never step on a non-finite loss or gradient
        result["skip_reason"] = "non-finite loss or gradients"
        return result
    success, grad_norm, _ = optimizer.step()
    result["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
    result["skipped"] = not success
    if not success:
        result["skip_reason"] = _why_megatron_skipped(optimizer, result["grad_norm"])
    return result


def _why_megatron_skipped(optimizer, grad_norm: float) -> str:
    """megatron's optimizer declined the update: a gradient norm over the threshold (0.18+)
    or an fp16 loss-scale overflow."""
    threshold = getattr(optimizer.config, "grad_norm_skip_threshold", math.inf)
    if math.isfinite(grad_norm) and grad_norm > threshold:
        return f"grad norm {grad_norm:.4g} above optim.grad_norm_skip_threshold={threshold:g}"
    return "the optimizer found non-finite gradients (fp16 loss-scale overflow)"
