"""YAML run configs into dataclasses, with `section.key=value` overrides and checked values.

An unknown key, a value of the wrong type, a choice outside its `Literal`, or a number out of
range is a one-line DanubeConfigError naming the key and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from typing import Any, Dict, List, Literal, Optional

import yaml

from megatron_danube.config.sections import RunConfig
from megatron_danube.errors import DanubeConfigError

_SCALARS = (bool, int, float, str)


# Keys of earlier releases, and what says the same now.
RENAMED_KEYS = {
    "chat.pack": "'chat.packing': bfd (best fit) | greedy (chat.pack: true) | none (chat.pack: "
    "false)",
}


def unknown_key(full: str, known) -> DanubeConfigError:
    """'unknown config key' with the closest known keys, or all of them when there are few;
    a key of a newer megatron-core (compat.py knows which) names the release."""
    from megatron_danube.compat import key_added_in

    if full in RENAMED_KEYS:
        return DanubeConfigError(f"config key {full!r} is now {RENAMED_KEYS[full]}")
    release = key_added_in(full)
    if release:
        return DanubeConfigError(
            f"config key {full!r} needs megatron-core {release} or newer; "
            f"upgrade megatron-core or remove the key"
        )
    section, _, name = full.rpartition(".")
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    close += [k for k in known if name in k and k not in close][: 3 - len(close)]
    where = f"{section}." if section else ""  # suggestions as the user would write them
    if close:
        hint = "did you mean " + " or ".join(repr(where + c) for c in close) + "?"
    else:
        hint = f"known keys: {', '.join(where + k for k in sorted(known))}"
    return DanubeConfigError(f"unknown config key {full!r}; {hint}")


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def yaml_settable(tp) -> bool:
    """Whether a field of this type can be written in YAML (dtypes and callables cannot)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return all(yaml_settable(a) for a in args if a is not type(None))
    if origin in (list, List, dict, Dict) or origin is Literal or tp is Any:
        return True
    return tp in _SCALARS or dataclasses.is_dataclass(tp)


def _coerce_union(value, tp, key: str):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except DanubeConfigError as exc:
            errors.append(str(exc))
    if len(errors) == 1:
        raise DanubeConfigError(errors[0] + (" or null" if type(None) in args else ""))
    raise DanubeConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _coerce_scalar(value, tp, key: str):
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DanubeConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise DanubeConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DanubeConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise DanubeConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise DanubeConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _coerce(value, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value not in args:
            raise DanubeConfigError(f"{key}={value!r}; choose one of {', '.join(map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, List):
        if not isinstance(value, list):
            raise DanubeConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise DanubeConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp in _SCALARS:
        return _coerce_scalar(value, tp, key)
    return value


def settable_fields(cls) -> Dict[str, Any]:
    """name -> type of the fields of a config dataclass that YAML can set."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if f.init and yaml_settable(hints[f.name])
    }


def _infinite_defaults(cls) -> Dict[str, float]:
    """Fields whose default is an infinite float, which then means "off".

    Numbers are otherwise refused when not finite, but megatron-core 0.18+ gives
    OptimizerConfig such a default (`grad_norm_skip_threshold=inf`); writing it back (the
    defaults, the resolved config.yaml) must stay possible.
    """
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if isinstance(f.default, float) and math.isinf(f.default)
    }


def from_dict(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DanubeConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = settable_fields(cls)
    infinite = _infinite_defaults(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise unknown_key(full, fields)
        if key in infinite and value == infinite[key]:
            kwargs[key] = value  # the class's own "off" value, e.g. .inf (see _infinite_defaults)
            continue
        kwargs[key] = _coerce(value, fields[key], full)
    try:
        return cls(**kwargs)
    except AssertionError as exc:  # megatron's config classes check combinations this way
        raise DanubeConfigError(f"{prefix or 'config'}: {exc}") from None


def to_dict(obj) -> dict:
    """The YAML-settable part of a config dataclass, as plain data."""
    if not dataclasses.is_dataclass(obj):
        if isinstance(obj, list):
            return [to_dict(v) for v in obj]
        return obj
    return {name: to_dict(getattr(obj, name)) for name in settable_fields(type(obj))}


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for depth, part in enumerate(parts):
        where = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise DanubeConfigError(
                    f"override {dotted}: {where} is not an existing list index "
                    f"(the list has {len(node)} entries: 0..{len(node) - 1})"
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise DanubeConfigError(
                f"override {dotted}: {'.'.join(parts[:depth])} is not a section"
            )
        if part not in node and not (depth and parts[depth - 1] == "overrides"):
            raise unknown_key(where, node)
        if last:
            node[part] = value
        else:
            node = node[part]


def _deep_update(base: dict, new, prefix: str) -> None:
    if not isinstance(new, dict):
        raise DanubeConfigError(f"{prefix or 'config'}: expected a mapping, got {new!r}")
    for key, value in new.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in base:
            raise unknown_key(full, base)
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "overrides":
            _deep_update(base[key], value, full)
        else:
            base[key] = value


def _fill_list_items(tree: dict, cls=RunConfig) -> None:
    """Give every entry of a list-of-sections field its defaults, so `stages.1.blend=...`
    can set a key the YAML entry left out."""
    hints = typing.get_type_hints(cls)
    for name, tp in hints.items():
        args = typing.get_args(tp)
        item = args[0] if typing.get_origin(tp) in (list, List) and args else None
        if item is not None and dataclasses.is_dataclass(item) and isinstance(tree.get(name), list):
            defaults = to_dict(item())
            tree[name] = [{**defaults, **v} if isinstance(v, dict) else v for v in tree[name]]


def load_config(path: Optional[str], overrides: List[str] = ()) -> RunConfig:
    """Defaults, then the YAML file, then the overrides; values checked before returning."""
    tree: dict = {}
    if path:
        try:
            with open(path) as f:
                tree = yaml.safe_load(f) or {}
        except OSError as exc:
            raise DanubeConfigError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0]
            raise DanubeConfigError(f"config {path} is not valid YAML: {first}") from None
    base = to_dict(RunConfig())  # start from the defaults so overrides of untouched keys work
    _deep_update(base, tree, "")
    _fill_list_items(base)
    for item in overrides:
        if "=" not in item:
            raise DanubeConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise DanubeConfigError(f"override {item!r}: the value is not valid YAML") from None
        _set_dotted(base, key.strip(), value)
    cfg = from_dict(RunConfig, base)
    check_values(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DanubeConfigError(message)


def check_values(cfg: RunConfig) -> None:
    """Ranges that types cannot express; each failure names the key and what is accepted."""
    t, o, c, log = cfg.train, cfg.optim, cfg.checkpoint, cfg.logging
    _require(t.train_tokens > 0, f"train.train_tokens={t.train_tokens}; it must be > 0")
    _require(t.global_batch_tokens > 0, "train.global_batch_tokens must be > 0")
    _require(t.micro_batch_size > 0, "train.micro_batch_size must be > 0")
    _require(t.max_bad_steps > 0, "train.max_bad_steps must be >= 1")
    _require(
        t.exit_after_steps is None or t.exit_after_steps > 0,
        "train.exit_after_steps must be >= 1 or null",
    )
    _require(
        o.optimizer in ("adam", "sgd"),
        f"optim.optimizer={o.optimizer!r}; use 'adam' (AdamW, the recipe's) or 'sgd'",
    )
    _require(
        o.optimizer == "adam" or not o.use_distributed_optimizer,
        "optim.optimizer='sgd' needs optim.use_distributed_optimizer=false (megatron's "
        "distributed optimizer shards Adam only)",
    )
    _require(o.lr is not None and o.lr >= 0, f"optim.lr={o.lr}; the learning rate must be >= 0")
    _require(o.min_lr is None or 0 <= o.min_lr <= o.lr, "optim.min_lr must be in [0, optim.lr]")
    for name in ("adam_beta1", "adam_beta2"):
        value = getattr(o, name)
        _require(0 <= value < 1, f"optim.{name}={value}; it must be in [0, 1)")
    _require(o.adam_eps > 0, f"optim.adam_eps={o.adam_eps}; it must be > 0")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay}; it must be >= 0")
    _require(o.clip_grad >= 0, f"optim.clip_grad={o.clip_grad}; it must be >= 0 (0: no clipping)")
    _require(o.warmup_tokens >= 0, f"optim.warmup_tokens={o.warmup_tokens}; it must be >= 0")
    _require(
        c.save_interval is None or c.save_interval > 0,
        f"checkpoint.save_interval={c.save_interval}; use a positive step count or null",
    )
    _require(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last}; keep at least 1")
    _require(log.log_interval > 0, f"logging.log_interval={log.log_interval}; it must be >= 1")
    _require(log.eval_interval >= 0, "logging.eval_interval must be >= 0 (0: only at the end)")
    _require(log.eval_iters >= 0, f"logging.eval_iters={log.eval_iters}; it must be >= 0")
    _require(cfg.stages, "stages is empty; give at least one stage with start_tokens: 0")
    for i, stage in enumerate(cfg.stages):
        _require(stage.seq_length > 0, f"stages[{i}].seq_length must be > 0")
        _require(stage.start_tokens >= 0, f"stages[{i}].start_tokens must be >= 0")
    # The chat and DPO settings are checked by the jobs that read them (training/jobs/sft.py).


def save_config(cfg: RunConfig, path: str, header: str = "") -> None:
    """The config as YAML that `load_config` reads back; `header` becomes comment lines."""
    with open(path, "w") as f:
        for line in header.splitlines():
            f.write(f"# {line}\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
