"""DPO-family losses on sequence log-probabilities, with TRL's definitions and metric names.

Inputs are per pair: the policy's and the reference's summed log-probabilities of the chosen
and the rejected completion (and their token counts, for IPO's length normalisation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def preference_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor = None,
    rejected_tokens: torch.Tensor = None,
) -> torch.Tensor:
    """The loss of each pair (not reduced)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        # DPO; with label smoothing eps, conservative DPO: eps of the labels assumed flipped.
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(
            -beta * delta
        )
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        # IPO on log-ratios averaged per completion token (TRL's normalisation).
        per_token = chosen_ratio / chosen_tokens.clamp(
            min=1
        ) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (per_token - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type {loss_type!r}; choose one of {LOSS_TYPES}")


# Summed over pairs, micro-batches and data-parallel ranks; divided by `pairs` for the metrics.
DPO_REPORT_FIELDS = (
    "loss",
    "pairs",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
DPO_REPORTS = {"dpo": len(DPO_REPORT_FIELDS)}


def pair_report(losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """The sums behind TRL's metrics: rewards are beta-scaled log-ratios."""
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return torch.stack(
        [
            losses.detach().sum(),
            torch.tensor(float(len(losses)), device=losses.device),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            (chosen_rewards - rejected_rewards).sum(),
            policy_chosen.detach().sum(),
            policy_rejected.detach().sum(),
        ]
    ).double()


def dpo_metrics(report: torch.Tensor, prefix: str = "") -> dict:
    values = dict(zip(DPO_REPORT_FIELDS, report.tolist()))
    pairs = max(values.pop("pairs"), 1.0)
    return {f"{prefix}{name}": value / pairs for name, value in values.items()}
