"""Direct preference optimisation on packed pairs, with precomputed reference log-probabilities.

A pair's chosen and rejected completions are two documents of the same packed row (so always in
the same micro-batch); the last pipeline stage sums megatron's per-token log-probabilities (the
vocab-parallel cross entropy, exact under TP) over each completion, and the loss of every pair
is summed, then divided once by the number of pairs in the global batch (megatron's
`calculate_per_token_loss` with pairs as the unit).

The reference model is the starting weights (`dpo.reference: precomputed`). Before the first
step one forward pass over all pairs (training and held-out) records its log-probabilities in
`RUN_DIR/reference_logps.npz`, keyed by a hash of the reference checkpoint's manifest and of the
tokenized data (which covers tokenizer, template and files); a resume with anything else is a
one-line error. With LoRA, `dpo.reference: adapters_off` takes the reference from the same model
with its adapters switched off: one extra forward pass over each step's pairs (and once over the
held-out pairs, the base being frozen), no file, and no second model.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import partial
from typing import Dict, List

import numpy as np
import torch

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training.job import RunContext
from megatron_danube.training.jobs.registry import JobSpec, register_job
from megatron_danube.training.jobs.sft import SFTJob, chat_plan
from megatron_danube.training.plan import Plan
from megatron_danube.training.preference_loss import (
    DPO_REPORTS,
    dpo_metrics,
    pair_report,
    preference_losses,
)

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.npz"
CHOSEN, REJECTED = 1, 2  # document kinds in a row; 0 is padding


def _document_sums(batch, per_token_loss):
    """(summed log-prob, supervised tokens) of every document of the row."""
    from megatron_danube.models.local_layers import document_ids

    mask = batch["loss_mask"].view(-1).to(per_token_loss.device, torch.float32)
    documents = document_ids(batch["cu_seqlens"], per_token_loss.device)
    n = len(batch["doc_kind"])
    token_logps = -per_token_loss.view(-1).float() * mask
    logps = torch.zeros(n, device=mask.device).index_add(0, documents, token_logps)
    tokens = torch.zeros(n, device=mask.device).index_add(0, documents, mask)
    return logps, tokens


def _dpo_loss(batch, per_token_loss, settings):
    logps, tokens = _document_sums(batch, per_token_loss)
    kinds = batch["doc_kind"].to(logps.device)
    ref = batch["ref_logps"].to(logps.device, torch.float32)
    chosen, rejected = kinds == CHOSEN, kinds == REJECTED
    losses = preference_losses(
        logps[chosen],
        logps[rejected],
        ref[chosen],
        ref[rejected],
        beta=settings.beta,
        loss_type=settings.loss_type,
        label_smoothing=settings.label_smoothing,
        chosen_tokens=tokens[chosen],
        rejected_tokens=tokens[rejected],
    )
    report = pair_report(
        losses, logps[chosen], logps[rejected], ref[chosen], ref[rejected], settings.beta
    )
    if settings.sft_weight:
        losses = losses + settings.sft_weight * (-logps[chosen] / tokens[chosen].clamp(min=1))
        report[0] = losses.detach().sum()
    pairs = torch.tensor(int(chosen.sum()), dtype=torch.int)
    return losses.sum(), pairs, {"dpo": report}


def _reference_loss(batch, per_token_loss, total: int):
    """Forward only: each document's log-probability at its global slot (2 pair + side)."""
    logps, _ = _document_sums(batch, per_token_loss)
    kinds, index = batch["doc_kind"].to(logps.device), batch["pair_index"].to(logps.device)
    real = kinds > 0
    slots = torch.zeros(total, dtype=torch.float64, device=logps.device)
    slots[2 * index[real] + kinds[real] - 1] = logps[real].double()
    return logps.sum() * 0, torch.tensor(0, dtype=torch.int), {"ref": slots}


def packed_step(loss, data_iterator, model):
    """The packed forward step with this job's loss on the per-token losses."""
    from megatron_danube.training.step import packed_forward_step

    batch = next(data_iterator)
    output, _ = packed_forward_step(iter([batch]), model)
    return output, partial(loss, batch)


class DPOJob(SFTJob):
    """The `Job` of DPO: pairs packed as documents, sequence log-probabilities, pair losses."""

    name = "dpo"
    report_sizes = DPO_REPORTS

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.forward_step = partial(packed_step, partial(_dpo_loss, settings=self.cfg.dpo))
        self.reference = {}
        self.resumed_key = None  # the reference key the run's own checkpoints recorded
        self.adapters_off = self.cfg.dpo.reference == "adapters_off"
        self.run = None

    @staticmethod
    def loss(reports: Dict[str, torch.Tensor]) -> float:
        report = reports["dpo"]
        return (report[0] / report[1].clamp(min=1)).item()

    def train_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        metrics = dpo_metrics(reports["dpo"])
        metrics.pop("loss")
        return metrics

    def eval_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        metrics = dpo_metrics(reports["dpo"], prefix="eval_")
        return {"val_loss": metrics.pop("eval_loss"), **metrics}

    # ---------------------------------------------------------------------------- data
    def _unit_lengths(self, samples) -> np.ndarray:
        from megatron_danube.data.chat.preference import pair_lengths

        return pair_lengths(samples)

    def _hold_out(self, samples, fraction: float):
        pairs = len(samples) // 2
        order = np.random.default_rng(self.cfg.data.seed).permutation(pairs)
        held = np.sort(order[: max(1, int(round(pairs * fraction)))])
        rest = np.sort(order[len(held) :])
        both = lambda idx: np.stack([2 * idx, 2 * idx + 1], axis=1).reshape(-1)  # noqa: E731
        return samples.subset(both(held)), samples.subset(both(rest))

    def _microbatch(self, samples, packs: List[List[int]]) -> dict:
        """Packs of pair indices -> one THD row; per document its kind, pair and reference."""
        from megatron_danube.data.chat.packing import packed_microbatch

        rows = [[i for pair in pack for i in (2 * pair, 2 * pair + 1)] for pack in packs]
        batch = packed_microbatch(samples, rows, self.seq_length, self.tokenizer.eod)
        kinds, index = [], []
        for pack, row in zip(packs, rows):
            for pair in pack:
                kinds += [CHOSEN, REJECTED]
                index += [pair, pair]
            if sum(len(samples.sample(i)[0]) for i in row) < self.seq_length:
                kinds.append(0)  # the row's padding document
                index.append(0)
        batch["doc_kind"] = torch.tensor(kinds, dtype=torch.long)
        batch["pair_index"] = torch.tensor(index, dtype=torch.long)
        reference = self.reference.get(id(samples))
        if reference is not None:
            slots = 2 * batch["pair_index"] + (batch["doc_kind"] - 1).clamp(min=0)
            batch["ref_logps"] = torch.from_numpy(reference)[slots]
        return batch

    # ---------------------------------------------------------------------------- reference
    def train_batch(self, state):
        if self.adapters_off:
            self._reference_by_base(self.train_samples, self.step_packs(state))
        return super().train_batch(state)

    def eval_batches(self, state):
        if self.adapters_off and self.valid_samples is not None:
            if id(self.valid_samples) not in self.reference:  # the base is frozen: once
                self._reference_by_base(self.valid_samples, self.valid_packs)
        return super().eval_batches(state)

    def _reference_by_base(self, samples, packs) -> None:
        """The reference log-probabilities of `packs`: the model with its adapters off."""
        from megatron_danube.models.lora import adapters_disabled

        with adapters_disabled(self.adapted_chunks):
            self.reference[id(samples)] = self._reference_logps(self.run, samples, packs)

    def restored(self, saved: dict) -> None:
        """A resume keeps the reference its checkpoints recorded; a start that still exists
        and is now another model is a changed input, refused."""
        super().restored(saved)
        before = "adapters_off" if saved.get("reference") == "adapters_off" else "precomputed"
        if "reference" in saved and before != self.cfg.dpo.reference:
            raise DanubeConfigError(
                f"{self.cfg.run_dir} trained with dpo.reference={before}; restore it (another "
                f"reference is another objective), or start a new run_dir"
            )
        if self.adapters_off:
            return  # the reference is the base, which the LoRA checks have named
        self.resumed_key = saved.get("reference")
        start = self.plan.start
        if start.convert_from_hf:  # an HF start: its conversion is named by its files
            recorded = saved.get("reference_source")
            if recorded and os.path.basename(recorded) != os.path.basename(start.checkpoint):
                raise DanubeConfigError(
                    f"{self.cfg.run_dir} holds reference log-probabilities of another reference "
                    f"model than checkpoint.load={self.cfg.checkpoint.load} (its files changed); "
                    f"restore checkpoint.load, or start a new run_dir"
                )
            return
        if not self.resumed_key or not start.checkpoint or not os.path.isdir(start.checkpoint):
            return  # the start may have been pruned: the run's own records suffice
        try:
            current = self._start_key()
        except DanubeConfigError:
            return  # no longer a readable checkpoint: as pruned
        if current != self.resumed_key:
            raise DanubeConfigError(
                f"{self.cfg.run_dir} holds reference log-probabilities of another reference "
                f"model or data than checkpoint.load={self.cfg.checkpoint.load} (hash "
                f"{self.resumed_key} != {current}); restore checkpoint.load, or start a new run_dir"
            )

    def reference_key(self) -> str:
        """The reference model and data, hashed: the start checkpoint's manifest (or, resumed,
        what the run's own checkpoints recorded, so the start may have been pruned since)."""
        if self.resumed_key:
            return self.resumed_key
        if not hasattr(self, "_reference_key"):
            self._reference_key = self._start_key()
        return self._reference_key

    def _start_key(self) -> str:
        from megatron_danube.training.checkpoint_format import resolve_checkpoint

        # Verified when it was loaded (or converted just now): only its manifest is read here.
        ckpt = resolve_checkpoint(self.plan.start.checkpoint, "checkpoint.load", verify=False)
        with open(reference_manifest(ckpt), "rb") as f:
            manifest = f.read()
        if self.plan.start.peft_adapter:  # the start's adapters are part of the reference
            from megatron_danube.models.peft_adapter import ADAPTER_WEIGHTS
            from megatron_danube.training.run_inputs import files_digest

            adapter = os.path.join(self.plan.start.peft_adapter, ADAPTER_WEIGHTS)
            manifest += files_digest([adapter]).encode()
        return hashlib.sha256(manifest + b"|" + str(self.data_key).encode()).hexdigest()[:24]

    def after_resume(self, run: RunContext) -> None:
        """Load the reference log-probabilities, or compute them from the starting weights."""
        self.run = run
        if self.adapters_off:
            return  # computed with each step
        path = os.path.join(self.cfg.run_dir, REFERENCE_FILE)
        key = self.reference_key()
        # One unshuffled pass: each pair once, whatever the epochs.
        sets = [("train", self.train_samples, self._packs(self.train_samples, 1, shuffle=False))]
        if self.valid_samples is not None and len(self.valid_packs):
            sets.append(("valid", self.valid_samples, self.valid_packs))
        stored = self._stored_reference(path, run)
        if stored is not None:
            if str(stored["key"]) != key:
                raise DanubeConfigError(
                    f"{path} holds reference log-probabilities of another reference model or "
                    f"data (hash {stored['key']} != {key}); restore checkpoint.load and "
                    f"chat files, or start a new run_dir"
                )
            for name, samples, _ in sets:
                self.reference[id(samples)] = stored[name]
            return
        if run.iteration > 0:
            raise DanubeConfigError(
                f"{path} is missing and the policy has moved from the reference; restore the file "
                f"or start a new run_dir"
            )
        arrays = {name: self._reference_logps(run, s, p) for name, s, p in sets}
        for name, samples, _ in sets:
            self.reference[id(samples)] = arrays[name]
        if run.is_main:
            tmp = f"{path}.tmp.npz"
            np.savez(tmp, key=np.array(key), **arrays)
            os.replace(tmp, path)
        pairs = len(arrays["train"]) // 2
        logger.info("reference log-probabilities of %d training pairs recorded in %s", pairs, path)

    @staticmethod
    def _stored_reference(path: str, run: RunContext):
        """The arrays of `path` (None: none yet). A damaged file is derived data: recomputed
        while the weights are still the reference's (iteration 0), else a one-line error."""
        from megatron_danube.data.chat.dataset import DAMAGED_CACHE

        if not os.path.exists(path):
            return None
        try:
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files}
        except DAMAGED_CACHE as exc:
            if run.iteration > 0:
                raise DanubeConfigError(
                    f"{path} is damaged ({type(exc).__name__}) and the policy has moved from the "
                    f"reference, so it cannot be recomputed; restore the file or start a new "
                    f"run_dir"
                ) from None
            logger.warning("%s is damaged (%s); recomputing it", path, exc)
            return None

    def _reference_logps(self, run: RunContext, samples, packs) -> np.ndarray:
        total = len(samples)  # two slots per pair: chosen, rejected
        step = partial(packed_step, partial(_reference_loss, total=total))
        n = self.packs_per_step
        batches = [self._batch(samples, packs[i : i + n]) for i in range(0, len(packs), n)]
        return run.forward_only(batches, step, {"ref": total})["ref"].cpu().numpy()

    def state_extra(self, state) -> dict:
        if self.adapters_off:
            return dict(super().state_extra(state), reference="adapters_off")
        return dict(
            super().state_extra(state),
            reference=self.reference_key(),
            reference_source=self.plan.start.checkpoint,
        )


def reference_manifest(checkpoint: str) -> str:
    """The manifest that names DPO's reference model, or a one-line error."""
    path = os.path.join(checkpoint, "manifest.json")
    if not os.path.isfile(path):
        raise DanubeConfigError(
            f"checkpoint.load: {checkpoint} has no manifest.json, which identifies DPO's "
            f"reference model; start from a checkpoint written by a run or by danube-convert"
        )
    return path


def plan(cfg: RunConfig) -> Plan:
    if cfg.dpo.reference == "adapters_off" and cfg.peft.method != "lora":
        raise DanubeConfigError(
            "dpo.reference=adapters_off takes the reference from the model with its LoRA "
            "adapters off; set peft.method=lora, or dpo.reference=precomputed"
        )
    planned = chat_plan(cfg, pairs=True)
    start = planned.start
    if cfg.dpo.reference == "precomputed" and not planned.resumes and not start.convert_from_hf:
        from megatron_danube.training.checkpoint_format import resolve_checkpoint

        reference_manifest(resolve_checkpoint(start.checkpoint, "checkpoint.load", verify=False))
    return planned


register_job(
    JobSpec(
        name="dpo",
        family="finetune",
        plan=plan,
        make=DPOJob,
        summary="direct preference optimisation on packed pairs, reference from the start",
    )
)
