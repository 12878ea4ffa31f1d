"""Supervised chat fine-tuning: packed conversations, loss on what the assistant wrote.

The data is tokenized once and cached (`data/chat`), packed into rows of `chat.seq_length`
tokens with attention, RoPE positions and labels restarting at every conversation, and the
loss is the mean over supervised tokens of the whole global batch (megatron's
`calculate_per_token_loss`: token sums, divided once by the batch's supervised-token count
across micro-batches and data-parallel ranks), so short and long samples weigh per token alike.
The step plan (which packs each step reads) is a function of the step index only, so a resume
reads exactly what an uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Dict, List

import numpy as np
import torch
import torch.distributed as dist

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training import preflight, run_inputs
from megatron_danube.training.job import Job, StepBatch, TrainState
from megatron_danube.training.jobs.registry import JobSpec, register_job
from megatron_danube.training.plan import ChatData, Plan
from megatron_danube.training.step import LM_REPORTS, lm_loss, packed_forward_step

logger = logging.getLogger(__name__)


def chat_plan(cfg: RunConfig, *, pairs: bool = False) -> Plan:
    """The plan of a chat job (`pairs`: DPO, both sides of a pair in one row)."""
    from megatron_danube.data.chat.encoder import chat_backend
    from megatron_danube.data.chat.records import check_files
    from megatron_danube.data.chat.template import ChatTemplate, resolve_template

    chat, train = cfg.chat, cfg.train
    _check_chat_values(cfg, pairs)
    if len(cfg.stages) > 1:
        raise DanubeConfigError(
            "stages schedule pretraining; a fine-tuning run uses chat.seq_length, remove stages"
        )
    if cfg.parallel.context_parallel > 1:
        # Packed rows would need splitting per CP rank by document (TE's THD partitioning).
        raise DanubeConfigError(
            "chat fine-tuning packs conversations and does not split them over context-parallel "
            "ranks; set parallel.context_parallel=1 (use TP/PP/DP)"
        )
    model = preflight.model_of(cfg)
    layout, dp = preflight.check_layout_for(cfg, model, chat.seq_length)
    packs_per_step, rem = divmod(train.global_batch_tokens, chat.seq_length)
    if rem or packs_per_step % (dp * train.micro_batch_size):
        raise DanubeConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} must be chat.seq_length "
            f"({chat.seq_length}) x a multiple of data-parallel size x micro_batch_size "
            f"({dp} x {train.micro_batch_size}); e.g. "
            f"{chat.seq_length * dp * train.micro_batch_size}"
        )
    if chat.demo_dir:
        from megatron_danube.data.demo_chat import ensure_demo_chat

        ensure_demo_chat(chat.demo_dir)
    if not chat.train:
        raise DanubeConfigError(
            f"job: {cfg.job} needs chat.train (JSONL files, .jsonl.gz or .jsonl.zst, or a "
            f"saved datasets directory)"
        )
    files = {"chat.train": tuple(check_files(chat.train, "chat.train"))}
    if chat.valid:
        files["chat.valid"] = tuple(check_files(chat.valid, "chat.valid"))
    preflight.check_run_dir(cfg.run_dir)
    tokenizer = preflight.run_tokenizer(cfg, model, "use the tokenizer the model was trained with")
    _, special = chat_backend(tokenizer)
    template = resolve_template(chat.template)
    ChatTemplate(template, special).check()  # a broken template fails now
    inputs = run_inputs.run_inputs(tokenizer, template, files)
    # Fine-tuning starts from weights only: the config says so as it runs (config.yaml).
    cfg.checkpoint.load_optimizer = False
    resumes, start = preflight.start_point(
        cfg,
        inputs,
        weights_only=True,
        required=f"job: {cfg.job} starts from trained weights; set checkpoint.load to a run "
        f"directory, a checkpoint, or an HF model directory",
    )
    return Plan(
        config=cfg,
        model=model,
        layout=layout,
        data_parallel=dp,
        max_seq_length=chat.seq_length,  # RoPE positions restart per conversation
        tokenizer=tokenizer,
        inputs=inputs,
        resumes=resumes,
        start=start,
        chat=ChatData(
            seq_length=chat.seq_length,
            sample_length=chat.seq_length // 2 if pairs else chat.seq_length,
            packs_per_step=packs_per_step,
            template=template,
            files=files,
        ),
        lora=_lora(cfg, layout[2], resumes, start),
    )


def _lora(cfg: RunConfig, spec: str, resumes: bool, start):
    """LoRA's settings; a resuming LoRA run's base must be the one its adapters were trained on
    (its checkpoints hold the adapters only)."""
    lora = preflight.lora_settings(cfg, spec, None if resumes else start.peft_adapter)
    if lora is not None and resumes:
        from megatron_danube.training.lora_checkpoints import check_base

        state = run_inputs.peek_train_state(os.path.join(cfg.run_dir, "checkpoints")) or {}
        recorded = state.get("lora") or {}
        if "base_manifest" in recorded:
            check_base(
                recorded,
                start.checkpoint,
                "set checkpoint.load to that base, or start a new run_dir",
            )
    return lora


def _check_chat_values(cfg: RunConfig, pairs: bool) -> None:
    """Ranges of the chat (and with `pairs` the DPO) settings, for the jobs that read them."""
    chat, dpo = cfg.chat, cfg.dpo
    least = 4 if pairs else 1  # a pair needs two sides of a prompt token and an answer token
    checks = [
        (chat.seq_length >= least, f"chat.seq_length={chat.seq_length}; it must be >= {least}"),
        (chat.epochs >= 1, f"chat.epochs={chat.epochs}; it must be >= 1"),
        (
            0 <= chat.valid_fraction < 1,
            f"chat.valid_fraction={chat.valid_fraction}; it must be in [0, 1)",
        ),
    ]
    if pairs:
        checks += [
            (dpo.beta > 0, f"dpo.beta={dpo.beta}; it must be > 0"),
            (
                0 <= dpo.label_smoothing < 0.5,
                f"dpo.label_smoothing={dpo.label_smoothing}; it must be in [0, 0.5)",
            ),
            (dpo.sft_weight >= 0, f"dpo.sft_weight={dpo.sft_weight}; it must be >= 0"),
        ]
    for ok, message in checks:
        if not ok:
            raise DanubeConfigError(message)


class SFTJob(Job):
    """The `Job` of chat fine-tuning."""

    name = "sft"  # also what the data files hold: conversations
    forward_step = staticmethod(packed_forward_step)
    report_sizes = LM_REPORTS
    transformer_overrides: Dict[str, object] = {"calculate_per_token_loss": True}
    loss = staticmethod(lm_loss)

    def __init__(self, plan: Plan):
        super().__init__(plan)
        self.model_cfg, self.tokenizer = plan.model, plan.tokenizer
        self.seq_length = plan.chat.seq_length
        self.packs_per_step = plan.chat.packs_per_step
        self.sample_length = plan.chat.sample_length
        self.template = plan.chat.template
        self._total_tokens = 0  # known once the data is read (setup)

    @property
    def total_tokens(self) -> int:
        return self._total_tokens

    def transform_model(self, chunks):
        if self.plan.lora is None:
            return chunks
        from megatron_danube.models.lora import apply_lora

        initial = None
        if self.plan.start.peft_adapter and not self.plan.resumes:
            from megatron_danube.models.peft_adapter import read_adapter_weights

            initial = read_adapter_weights(self.plan.start.peft_adapter)
        self.adapted_chunks = apply_lora(chunks, self.model_cfg, self.plan.lora, initial)
        return self.adapted_chunks

    def absent_from_start(self, name: str) -> bool:
        from megatron_danube.models.lora import is_adapter_name

        return self.plan.lora is not None and is_adapter_name(name)

    def checkpoint_holds(self, name: str) -> bool:
        from megatron_danube.models.lora import is_adapter_name

        return self.plan.lora is None or is_adapter_name(name)

    @property
    def start_is_base(self) -> bool:
        return self.plan.lora is not None

    def restored(self, saved: dict) -> None:
        """A LoRA run resumes with the adapters' shape and scale it saved."""
        recorded, lora = saved.get("lora"), self.plan.lora
        if lora is None or recorded is None:
            if (lora is None) != (recorded is None):
                now = "with" if lora is not None else "without"
                raise DanubeConfigError(
                    f"{self.cfg.run_dir} holds checkpoints of a run "
                    f"{'with' if recorded else 'without'} LoRA adapters and this config is "
                    f"{now} them (peft.method); restore peft.method, or start a new run_dir"
                )
            return
        targets = sorted(p for projs in lora.targets.values() for p in projs)
        now = dict(rank=lora.rank, alpha=lora.alpha, targets=targets)
        before = {k: recorded.get(k, now[k]) for k in now}
        if before != now:
            raise DanubeConfigError(
                f"{self.cfg.run_dir} holds adapters with {before} but peft now says {now}; "
                f"restore peft, or start a new run_dir"
            )

    # ------------------------------------------------------------------------------ data
    def setup(self, rt) -> None:
        from megatron.core import parallel_state
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

        self.rt = rt
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.train_samples, self.valid_samples, self.data_key = self._read_data(
            rt.is_main, rt.launch.local_rank == 0
        )
        self.train_packs = self._packs(self.train_samples, self.cfg.chat.epochs, shuffle=True)
        self.valid_packs = self._packs(self.valid_samples, 1, shuffle=False)
        steps = math.ceil(len(self.train_packs) / self.packs_per_step)
        self._total_tokens = steps * self.cfg.train.global_batch_tokens
        if self.cfg.optim.warmup_tokens >= self._total_tokens:
            raise DanubeConfigError(
                f"optim.warmup_tokens {self.cfg.optim.warmup_tokens} must be below the run's "
                f"{self._total_tokens} tokens ({steps} steps of {self.packs_per_step} packs)"
            )
        self._log_plan(steps)
        init_num_microbatches_calculator(
            rt.rank,
            None,
            self.packs_per_step,
            self.cfg.train.micro_batch_size,
            rt.data_parallel,
            decrease_batch_size_if_needed=False,
        )

    def _read_data(self, is_main: bool, node_main: bool):
        from megatron_danube.data.chat.dataset import data_identity, describe, shared_samples
        from megatron_danube.data.chat.encoder import ChatEncoder

        chat = self.cfg.chat
        encoder = ChatEncoder(self.tokenizer, self.template, self.sample_length, chat.truncation)
        cache_dir = os.path.join(self.cfg.run_dir, "data_cache")
        files = self.plan.chat.files
        sets = {"train": list(files["chat.train"])}
        if "chat.valid" in files:
            sets["valid"] = list(files["chat.valid"])
        loaded = shared_samples(
            sets,
            encoder,
            cache_dir,
            kind=self.name,
            workers=chat.workers or len(os.sched_getaffinity(0)),
            is_main=is_main,
            node_main=node_main,  # the launcher's local rank: torchrun's or SLURM's
            barrier=dist.barrier,
        )
        keys = {name: data_identity(paths, encoder, self.name) for name, paths in sets.items()}
        for name, samples in loaded.items():
            log = logger.warning if samples.stats.get("bad_records") else logger.info
            log("chat %s data: %s", name, describe(samples.stats))
        for name, samples in loaded.items():  # a file given to read must have rows to read
            if len(samples) == 0:
                raise DanubeConfigError(
                    f"chat.{name} has no usable sample ({describe(samples.stats)})"
                )
        train, valid = loaded["train"], loaded.get("valid")
        if valid is None and chat.valid_fraction > 0:
            valid, train = self._hold_out(train, chat.valid_fraction)
        # Names every tokenized set the run reads (DPO keys its reference log-probs by it).
        return train, valid, "+".join(keys[name] for name in sets)

    def _hold_out(self, samples, fraction: float):
        """(held-out, rest), a deterministic share of the samples."""
        order = np.random.default_rng(self.cfg.data.seed).permutation(len(samples))
        held = max(1, int(round(len(samples) * fraction)))
        return samples.subset(np.sort(order[:held])), samples.subset(np.sort(order[held:]))

    def _packs(self, samples, epochs: int, shuffle: bool) -> List[List[int]]:
        from megatron_danube.data.chat.packing import epoch_packs

        if samples is None or len(samples) == 0:
            return []
        return epoch_packs(
            self._unit_lengths(samples),
            self.seq_length,
            epochs=epochs,
            seed=self.cfg.data.seed,
            packing=self.cfg.chat.packing,
            shuffle=shuffle,
        )

    def _unit_lengths(self, samples) -> np.ndarray:
        """Lengths of what packing places whole (a conversation here)."""
        return samples.lengths

    def _microbatch(self, samples, packs: List[List[int]]) -> dict:
        from megatron_danube.data.chat.packing import packed_microbatch

        return packed_microbatch(samples, packs, self.seq_length, self.tokenizer.eod)

    def _log_plan(self, steps: int) -> None:
        from megatron_danube.data.chat.packing import fill_rate

        lengths = self._unit_lengths(self.train_samples)
        epochs = self.cfg.chat.epochs
        logger.info(
            "%s plan: %.0f rows of %d tokens per epoch (%s packing, %.1f%% filled) over %d "
            "epoch(s) -> %d steps of %d rows; %d validation rows",
            self.name,
            len(self.train_packs) / epochs,
            self.seq_length,
            self.cfg.chat.packing,
            100.0 * fill_rate(lengths, self.train_packs, self.seq_length),
            epochs,
            steps,
            self.packs_per_step,
            len(self.valid_packs),
        )

    # ------------------------------------------------------------------------------ batches
    def _batch(self, samples, packs: List[List[int]]) -> StepBatch:
        from megatron_danube.training.metrics import flops_per_token

        mbs, gbt = self.cfg.train.micro_batch_size, self.cfg.train.global_batch_tokens
        packs = packs + [[] for _ in range(self.packs_per_step - len(packs))]  # the last step
        per_rank = self.packs_per_step // self.rt.data_parallel
        mine = packs[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        micro = [self._microbatch(samples, mine[i : i + mbs]) for i in range(0, per_rank, mbs)]
        chunks = max(1, self.cfg.parallel.virtual_pipeline)
        return StepBatch(
            iterators=[iter(list(micro)) for _ in range(chunks)],
            num_microbatches=len(micro),
            seq_length=mbs * self.seq_length,  # one THD row per micro-batch
            micro_batch_size=1,
            tokens=gbt,
            flops=gbt * flops_per_token(self.model_cfg, self.seq_length),
            labels={"seq_length": self.seq_length},
        )

    def step_packs(self, state: TrainState) -> List[List[int]]:
        """The packs the step after `state` reads (a function of the step index only)."""
        step = state.consumed_tokens // self.cfg.train.global_batch_tokens
        first = step * self.packs_per_step
        return self.train_packs[first : first + self.packs_per_step]

    def train_batch(self, state: TrainState) -> StepBatch:
        return self._batch(self.train_samples, self.step_packs(state))

    def eval_batches(self, state: TrainState) -> List[StepBatch]:
        n = self.packs_per_step
        return [
            self._batch(self.valid_samples, self.valid_packs[i : i + n])
            for i in range(0, len(self.valid_packs), n)
        ]

    def eval_metrics(self, reports: Dict[str, torch.Tensor]) -> Dict[str, float]:
        loss = lm_loss(reports)
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 50)),
            "val_supervised_tokens": float(reports["lm loss"][1]),
        }

    def state_extra(self, state: TrainState) -> dict:
        # The export writes this template into tokenizer_config.json (danube-convert --to hf).
        extra = {"job": self.name, "chat_data": self.data_key, "chat_template": self.template}
        if self.plan.lora is not None:  # what danube-convert needs to merge or export them
            from megatron_danube.training.lora_checkpoints import base_record

            lora, start = self.plan.lora, self.plan.start
            if not hasattr(self, "_base_record"):  # the base never changes during a run
                self._base_record = base_record(start.checkpoint)
            extra["lora"] = dict(
                rank=lora.rank,
                alpha=lora.alpha,
                dropout=lora.dropout,
                targets=sorted(p for projs in lora.targets.values() for p in projs),
                base=start.convert_from_hf or start.checkpoint,
                **self._base_record,
            )
        return extra

    def schedule(self) -> dict:
        chat = self.cfg.chat
        return {
            "job": self.name,
            "train.global_batch_tokens": self.cfg.train.global_batch_tokens,
            "chat.seq_length": chat.seq_length,
            "chat.epochs": chat.epochs,
            "chat.packing": chat.packing,
            "chat.train": list(chat.train),
            "data.seed": self.cfg.data.seed,
        }


register_job(
    JobSpec(
        name="sft",
        family="finetune",
        plan=chat_plan,
        make=SFTJob,
        summary="chat fine-tuning on packed conversations, loss on the answers",
    )
)
