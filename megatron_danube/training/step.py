"""One training or evaluation step through megatron-core's pipeline schedules.

Shared by the trainer, the benchmarks and the parity tests, so all of them exercise the same
path: megatron DDP, `get_forward_backward_func`, `finalize_model_grads`, megatron optimizer.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterator, List, Optional

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
    check_for_nan_in_grad: bool = False,
    bucket_size: Optional[int] = None,
) -> List[DistributedDataParallel]:
    """Megatron DDP around each chunk, and the config hooks the schedules call."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=check_for_nan_in_grad,
        bucket_size=bucket_size,
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


def _masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of token losses and the token count: megatron divides by the count and microbatches."""
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(per_token_loss.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


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


def forward_backward(
    chunks: List[torch.nn.Module],
    data_iterators: List[Iterator],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> torch.Tensor:
    """Run the schedule; return [loss_sum, tokens] summed over microbatches and DP ranks.

    The result is valid on every rank (broadcast from the last pipeline stage).
    """
    fwd_bwd = get_forward_backward_func()
    results = fwd_bwd(
        forward_step_func=lm_forward_step,
        data_iterator=data_iterators if len(chunks) > 1 else data_iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
    device = next(chunks[0].parameters()).device
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for item in results:
            totals += item["lm loss"].to(torch.float64)
    # Sum over DP x CP (each saw different tokens), then share from the last PP stage.
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    return totals


def zero_grads(chunks: List[DistributedDataParallel], optimizer=None) -> None:
    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()


def train_step(
    chunks: List[DistributedDataParallel],
    optimizer,
    data_iterators: List[Iterator],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> Dict[str, float]:
    """Forward, backward, optimizer step. Returns loss, grad norm and whether the step ran."""
    zero_grads(chunks, optimizer)
    totals = forward_backward(
        chunks,
        data_iterators,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
    )
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if optimizer is None:
        return {"loss": loss, "grad_norm": float("nan"), "skipped": False, "tokens": totals[1].item()}
    if not torch.isfinite(torch.tensor(loss)):
        # Megatron's fp32 optimizer has no inf check; never step on a non-finite loss.
        return {"loss": loss, "grad_norm": float("nan"), "skipped": True, "tokens": totals[1].item()}
    success, grad_norm, _ = optimizer.step()
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    return {"loss": loss, "grad_norm": grad_norm, "skipped": not success, "tokens": totals[1].item()}
