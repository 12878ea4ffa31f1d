"""Chat templates: one Jinja template renders every conversation, for training and inference.

The same template string goes into the exported tokenizer's `tokenizer_config.json`, so what
`transformers`' `apply_chat_template` renders at inference is what fine-tuning trained on. It is
rendered here with the environment transformers uses (sandboxed, `trim_blocks`, `lstrip_blocks`,
`loopcontrols`, `raise_exception`), without importing transformers.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Tuple

from megatron_danube.errors import DanubeConfigError

# H2O-Danube's released chat format: `<|system|>..</s><|prompt|>..</s><|answer|>..</s>`, no BOS,
# and `<|answer|>` as the generation prompt.
DANUBE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '<|prompt|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|answer|>' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|answer|>' }}{% endif %}"
)

TEMPLATES = {"danube": DANUBE_TEMPLATE}

# What the Danube template writes before each role's content (its content and `eos_token`
# follow); the native renderer below writes exactly what the Jinja template renders.
DANUBE_ROLE_TAGS = {"system": "<|system|>", "user": "<|prompt|>", "assistant": "<|answer|>"}

ROLES = ("system", "user", "assistant")


class TemplateError(Exception):
    """Raised by a template's `raise_exception`, e.g. for a role it does not know."""


def resolve_template(spec: str) -> str:
    """A registered name (`danube`), a `.jinja` file, or the Jinja text itself."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    if spec.endswith((".jinja", ".j2")) or (os.sep in spec and "{" not in spec):
        if not os.path.isfile(spec):
            raise DanubeConfigError(f"chat.template file {spec} not found")
        with open(spec, encoding="utf-8") as f:
            text = f.read()
        _compile(text)  # a file is checked as inline text is
        return text
    if "{%" in spec or "{{" in spec:
        _compile(spec)  # a syntax error is reported now, not at the first conversation
        return spec
    raise DanubeConfigError(
        f"chat.template={spec!r}; give one of {sorted(TEMPLATES)}, a .jinja file or Jinja text"
    )


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise DanubeConfigError(f"chat template does not compile: {exc}") from None


class ChatTemplate:
    """Renders conversations; `special_tokens` are the names templates use (`eos_token`, ...)."""

    def __init__(self, template: str, special_tokens: Dict[str, Optional[str]]):
        self.source = template
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self._compiled = _compile(template)

    def __getstate__(self):  # the compiled template does not pickle: its source does
        return {"source": self.source, "special_tokens": self.special_tokens}

    def __setstate__(self, state) -> None:
        self.__init__(state["source"], state["special_tokens"])

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text; a template error (a Jinja one, e.g. an undefined name,
        or its own `raise_exception`) is raised as `TemplateError`."""
        from jinja2.exceptions import TemplateError as JinjaError

        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except TemplateError:
            raise
        except (JinjaError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc}") from None

    def render_with_spans(
        self, messages: List[dict], first: int = 0
    ) -> Optional[Tuple[str, List[Tuple[int, int]]]]:
        """The conversation's text and the character range of what each assistant turn from
        message `first` on wrote (its content and closing tokens), in one pass, for the
        templates whose output this module writes natively (the built-in `danube`: no Jinja,
        no prefix renders); None for any other template (render prefixes with Jinja)."""
        eos = self.special_tokens.get("eos_token")
        if self.source != DANUBE_TEMPLATE or eos is None:
            return None
        parts, spans, length = [], [], 0
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            tag = DANUBE_ROLE_TAGS.get(role)
            if tag is None:
                raise TemplateError(f"unknown role {role}")
            if not isinstance(content, str):
                raise TemplateError(f"TypeError: content of a {role} message is not a string")
            piece = tag + content + eos
            if role == "assistant" and i >= first:
                spans.append((length + len(tag), length + len(piece)))
            parts.append(piece)
            length += len(piece)
        return "".join(parts), spans

    def check(self) -> None:
        """Render a probe conversation (a user turn and an answer, with and without the
        generation prompt): a template that compiles but cannot render fails here, in one
        line, before anything is written."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            self.render(probe)
            self.render(probe[:1], add_generation_prompt=True)
        except TemplateError as exc:
            raise DanubeConfigError(
                f"chat template fails on a probe conversation (user, assistant): {exc}; fix "
                f"the template"
            ) from None
