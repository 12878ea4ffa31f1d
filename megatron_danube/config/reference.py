"""The configuration reference, generated from the field docstrings in `sections.py`.

The README's table is this output (a test keeps them equal), so the documentation of a field
lives in one place: the string under the field.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Dict, List, Tuple

from megatron_danube.config import sections
from megatron_danube.config.loader import settable_fields

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def field_docs(cls) -> Dict[str, str]:
    """name -> the string literal under each field of a dataclass defined in `sections`."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(cls, name: str) -> str:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e4:
        return f"{value:.0e}"
    return str(value) if not isinstance(value, str) else value


def _type(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin is typing.Union:
        return " \\| ".join(_type(a) for a in args if a is not type(None)) + " \\| null"
    if origin in (list, List):
        return "list"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def rows() -> List[Tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every documented field, in declaration order."""
    out = []
    top = field_docs(sections.RunConfig)
    for name, tp in settable_fields(sections.RunConfig).items():
        args = typing.get_args(tp)
        cls = args[0] if typing.get_origin(tp) in (list, List) and args else tp
        if not dataclasses.is_dataclass(cls):
            out.append((name, _type(tp), _default(sections.RunConfig, name), top.get(name, "")))
            continue
        prefix = f"{name}[i]" if cls is not tp else name
        docs = field_docs(cls)
        hints = settable_fields(cls)
        for field_name, doc in docs.items():
            out.append(
                (f"{prefix}.{field_name}", _type(hints[field_name]), _default(cls, field_name), doc)
            )
    return out


def markdown() -> str:
    lines = [START, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, tp, default, doc in rows():
        lines.append(f"| `{key}` | {tp} | `{default}` | {doc} |")
    lines += [
        "",
        "`optim` is megatron-core's `OptimizerConfig`: every other field of it can be set too "
        "(`optim.adam_beta1`, `optim.adam_eps`, `optim.loss_scale`, ...), except the precision "
        "fields, which follow `precision.params_dtype`.",
        "",
        END,
    ]
    return "\n".join(lines)
