"""One preflight: a config checked once, before any process group or data exists, into a Plan.

`build_plan(cfg)` looks the job up in the registry and runs its `plan`, which calls the shared
checks below (model, layout, run directory, tokenizer, start point) in the order its derived
values need them. Every failure is a one-line `DanubeConfigError` naming the problem and the
fix; nothing is written before the plan exists.
"""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Dict, Optional, Tuple

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training import run_inputs
from megatron_danube.training.plan import Plan, StartPoint

HF_BASE_DIR = "base_from_hf"


def build_plan(cfg: RunConfig) -> Plan:
    """The frozen plan of `cfg`'s job; `cfg` itself is left as it was."""
    from megatron_danube.training.jobs.registry import get_job

    return get_job(cfg.job).plan(copy.deepcopy(cfg))


def model_of(cfg: RunConfig):
    """The preset with `model.overrides` applied."""
    from megatron_danube.models.presets import get_preset

    return get_preset(cfg.model.preset).replace(**cfg.model.overrides)


def check_layout_for(cfg: RunConfig, model, seq_length: int) -> Tuple[tuple, int]:
    """(check_layout's answer, data-parallel size) for the launch this process is part of."""
    from megatron_danube.runtime.distributed import check_layout

    layout = check_layout(
        model,
        cfg.parallel,
        spec=cfg.model.spec,
        device=cfg.train.device,
        seq_length=seq_length,
        fp8=cfg.precision.fp8,
    )
    if cfg.precision.params_dtype == "float16" and layout[1] != "cuda":
        raise DanubeConfigError("precision.params_dtype=float16 needs a GPU; use float32 on CPU")
    return layout, cfg.parallel.data_parallel(layout[0].world_size)


def check_run_dir(run_dir: str) -> None:
    """The run directory can be created and written."""
    probe = run_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe):
        raise DanubeConfigError(f"run_dir {run_dir}: {probe} is a file; choose another run_dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DanubeConfigError(f"run_dir {run_dir}: {probe} is not writable; choose another")
    ckpts = os.path.join(run_dir, "checkpoints")
    if os.path.exists(ckpts) and not os.path.isdir(ckpts):
        raise DanubeConfigError(f"{ckpts} is a file; move it away or choose another run_dir")


def run_tokenizer(cfg: RunConfig, model, fix: str):
    """The run's tokenizer, refused (naming `fix`) when it has more tokens than the model."""
    from megatron_danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    if tokenizer.vocab_size > model.vocab_size:
        raise DanubeConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model {model.name} has vocab "
            f"{model.vocab_size}; {fix}"
        )
    return tokenizer


def is_hf_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.exists(
        os.path.join(path, "latest")
    )


def hf_start_dir(hf_dir: str, run_dir: str) -> str:
    """Where a run keeps its conversion of `hf_dir`: named by the source's path and files
    (name, size, modification time), so other or changed weights are converted afresh."""
    digest = hashlib.sha256(os.path.abspath(hf_dir).encode())
    for name in sorted(os.listdir(hf_dir)):
        info = os.stat(os.path.join(hf_dir, name))
        digest.update(f"|{name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return os.path.join(run_dir, f"{HF_BASE_DIR}-{digest.hexdigest()[:12]}")


def start_point(
    cfg: RunConfig, inputs: Dict[str, str], *, weights_only: bool, required: Optional[str] = None
) -> Tuple[bool, StartPoint]:
    """(whether the run resumes its own checkpoints, where a fresh run's weights come from).

    A run with checkpoints of its own resumes from them alone: `checkpoint.load` is then not
    read (it may have been moved or pruned since), except by a LoRA run, whose checkpoints
    hold the adapters only (the job checks the base it names). Otherwise `checkpoint.load`
    must exist, be trained with this run's tokenizer, and (with `required`, the job's reason)
    be set. An HF PEFT adapter directory as `checkpoint.load` starts the adapters; its base
    (`peft.base`, or the adapter's own) gives the weights.
    """
    load, verify = cfg.checkpoint.load, cfg.checkpoint.verify
    load_optimizer = cfg.checkpoint.load_optimizer and not weights_only
    adapter = None
    if load and os.path.isdir(load):
        from megatron_danube.models.peft_adapter import (
            adapter_base,
            is_peft_adapter_dir,
            read_adapter_config,
        )

        if is_peft_adapter_dir(load):
            if cfg.peft.method != "lora":
                raise DanubeConfigError(
                    f"checkpoint.load={load} is an HF PEFT adapter; set peft.method=lora to "
                    f"train it, or load a full model"
                )
            adapter, load = load, adapter_base(load, read_adapter_config(load), cfg.peft.base)
    if run_inputs.check_resume(cfg, inputs):
        if load and os.path.isdir(load) and is_hf_model_dir(load):  # named as a fresh run would
            return True, StartPoint(hf_start_dir(load, cfg.run_dir), False, True, load, adapter)
        return True, StartPoint(load, load_optimizer, verify, None, adapter)
    if not load:
        if required:
            raise DanubeConfigError(required)
        return False, StartPoint(None, False, verify)
    if not os.path.isdir(load):
        raise DanubeConfigError(f"checkpoint.load={load} is not a directory")
    run_inputs.check_start(load, inputs)
    if is_hf_model_dir(load):
        return False, StartPoint(hf_start_dir(load, cfg.run_dir), False, True, load, adapter)
    from megatron_danube.training.checkpoint_format import resolve_checkpoint

    # That it names a checkpoint, now; its CRCs are checked once, when it is loaded.
    resolve_checkpoint(load, "checkpoint.load", verify=False)
    if (run_inputs.peek_train_state(load) or {}).get("lora", {}).get("base_manifest"):
        raise DanubeConfigError(
            f"checkpoint.load={load} holds a LoRA run's adapters only; to train them on, export "
            f"them with danube-convert --to hf-peft and load that directory (peft.method=lora), "
            f"or merge them (--to hf --merge-lora) and load the HF directory"
        )
    return False, StartPoint(load, load_optimizer, verify, None, adapter)


def lora_settings(cfg: RunConfig, spec: str, adapter: Optional[str] = None):
    """LoRA's settings from `peft` (None without `peft.method`), checked for the resolved
    layer `spec` and, where the adapters start from an HF PEFT directory, against its config."""
    from megatron_danube.models.lora import LoraSettings, resolve_targets

    peft = cfg.peft
    if peft.method is None:
        return None
    if spec != "local":
        # TE fuses the norm into qkv and fc1: the adapters would read the input un-normed.
        raise DanubeConfigError(
            "peft.method=lora runs on the local layer spec; set model.spec=local (TE's fused "
            "norm and linear layers take no adapters yet)"
        )
    if peft.rank < 1 or peft.alpha <= 0 or not 0 <= peft.dropout < 1:
        raise DanubeConfigError(
            f"peft: rank={peft.rank}, alpha={peft.alpha}, dropout={peft.dropout}; give rank >= 1, "
            f"alpha > 0 and dropout in [0, 1)"
        )
    targets = resolve_targets(peft.target_modules, peft.exclude_modules)
    if adapter is not None:
        _check_adapter_fits(adapter, peft, targets)
    return LoraSettings(peft.rank, peft.alpha, peft.dropout, targets, cfg.train.seed)


def _check_adapter_fits(adapter: str, peft, targets) -> None:
    """An imported adapter trains as it was made: `peft` must say the same rank, alpha and
    projections (a silent change of scale or targets would be another model)."""
    from megatron_danube.models.peft_adapter import read_adapter_config

    config = read_adapter_config(adapter)
    ours = sorted(p for projs in targets.values() for p in projs)
    theirs = sorted(set(config["target_modules"]))
    differ = [
        f"{key}={mine} but the adapter has {value}"
        for key, mine, value in (
            ("peft.rank", peft.rank, config.get("r")),
            ("peft.alpha", peft.alpha, config.get("lora_alpha")),
            ("peft.target_modules", ours, theirs),
        )
        if mine != value
    ]
    if differ:
        raise DanubeConfigError(
            f"checkpoint.load={adapter}: {'; '.join(differ)}; set peft to the adapter's "
            f"values (rank {config.get('r')}, alpha {config.get('lora_alpha')}, target_modules "
            f"{theirs})"
        )


def check_warmup(cfg: RunConfig, total_tokens: int, what: str) -> None:
    if not cfg.optim.warmup_tokens < total_tokens:
        raise DanubeConfigError(
            f"optim.warmup_tokens {cfg.optim.warmup_tokens} must be below {what} {total_tokens}"
        )
