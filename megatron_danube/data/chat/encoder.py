"""Conversation -> token ids, labels and a loss mask, the way inference will see the text.

The whole conversation is rendered by the chat template and tokenized once, with the HF
`tokenizers` pipeline the export writes (`tokenizer.json`), so the ids equal what
`apply_chat_template` gives on the exported tokenizer; tokenizing turn by turn would not (a
piece can merge across a turn boundary, and SentencePiece's dummy prefix would be added to
every chunk). Which tokens an assistant wrote is found by rendering prefixes of the
conversation: the text up to the generation prompt before an assistant turn, and up to the end
of that turn (its closing `</s>` included); the built-in template gives those bounds in the
same pass as the text (`ChatTemplate.render_with_spans`). Tokens are supervised by *position*
(their character span falls in such a range), never by token value.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np

from megatron_danube.data.chat.piece_offsets import PieceOffsets
from megatron_danube.data.chat.template import ChatTemplate, TemplateError
from megatron_danube.errors import DanubeConfigError


@dataclass
class EncodedSample:
    """One conversation, ready to pack: `labels[t]` is `tokens[t + 1]` of the same sample."""

    tokens: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def supervised(self) -> int:
        return int(self.loss_mask.sum())


class SampleError(ValueError):
    """A record that renders or tokenizes badly; reported as `file:line` and skipped."""


def chat_backend(tokenizer):
    """The `tokenizers.Tokenizer` and special-token strings an HF export of `tokenizer` has;
    built once per tokenizer object (the preflight and the job's encoder share it)."""
    cached = getattr(tokenizer, "_chat_backend", None)
    if cached is None:
        cached = _build_chat_backend(tokenizer)
        tokenizer._chat_backend = cached
    return cached


def _build_chat_backend(tokenizer):
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise DanubeConfigError(
            'chat fine-tuning needs the tokenizers package; pip install -e ".[hf]"'
        ) from None
    if tokenizer.kind == "sentencepiece":
        from megatron_danube.data.hf_tokenizer import (
            _load_proto,
            _special_tokens_map,
            build_backend,
        )

        proto = _load_proto(tokenizer.path)
        return build_backend(proto), _special_tokens_map(proto)
    if tokenizer.kind == "huggingface":
        hf = tokenizer._tok
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise DanubeConfigError(
                f"{tokenizer.path}: chat fine-tuning needs a fast tokenizer (tokenizer.json)"
            )
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return backend, {n: getattr(hf, n, None) for n in names}
    raise DanubeConfigError(f"tokenizer kind {tokenizer.kind!r} cannot be used for chat data")


class ChatEncoder:
    """Renders, tokenizes and masks conversations (lists of {role, content} dicts)."""

    def __init__(self, tokenizer, template: str, seq_length: int, truncation: str = "left"):
        # seq_length: the longest sample kept (longer ones are truncated)
        self.backend, special = chat_backend(tokenizer)
        self.template = ChatTemplate(template, special)
        self.seq_length = seq_length
        self.truncation = truncation
        self.eos_id = tokenizer.eod
        self.bos_id = getattr(tokenizer, "bos", None)
        # The pipeline this package builds from a SentencePiece model (a normalizer that adds
        # and replaces characters one for one, BPE with byte fallback) gives offsets that
        # never decrease, so the tokens of a character range can be found by bisection; any
        # other tokenizer's offsets are read whole.
        self.ordered_offsets = tokenizer.kind == "sentencepiece"
        # That pipeline's offsets follow from the ids alone: the tokenizer is then asked for
        # ids only, which is faster (see piece_offsets).
        self.piece_offsets = PieceOffsets.for_backend(self.backend)
        if not hasattr(self.backend, "encode_batch_fast"):  # tokenizers < 0.21
            self.piece_offsets = None

    def identity(self) -> str:
        """What the encoding depends on besides the data (for cache keys)."""
        return "\n".join(
            [self.backend.to_str(), self.template.source, str(self.seq_length), self.truncation]
        )

    def render(self, messages: List[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            raise SampleError(f"chat template refused the conversation: {exc}") from None

    def assistant_spans(
        self, messages: List[dict], text: str, first: int = 0
    ) -> List[Tuple[int, int]]:
        """Character ranges of what each assistant turn from message `first` on wrote (content
        and closing tokens)."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i < first:
                continue
            start = self.render(messages[:i], add_generation_prompt=True)
            end = self.render(messages[: i + 1])
            if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
                raise SampleError(
                    "the chat template renders a conversation's prefix differently from the "
                    "whole conversation, so assistant turns cannot be located"
                )
            spans.append((len(start), len(end)))
        return spans

    def encode_ids(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def locate(self, messages: List[dict], supervise_from: int = 0):
        """(text, assistant spans): in one pass for a template rendered natively, else by
        Jinja with prefix renders."""
        try:
            native = self.template.render_with_spans(messages, supervise_from)
        except TemplateError as exc:
            raise SampleError(f"chat template refused the conversation: {exc}") from None
        if native is not None:
            return native
        text = self.render(messages)
        return text, self.assistant_spans(messages, text, supervise_from)

    def encode(self, messages: List[dict], supervise_from: int = 0) -> EncodedSample:
        """`supervise_from`: only assistant turns at or after this message index are trained
        (a preference pair's completion, not the earlier turns of its prompt)."""
        text, spans = self.locate(messages, supervise_from)
        return self._masked(self.backend.encode(text, add_special_tokens=False), text, spans)

    def encode_many(self, conversations: List[Tuple[List[dict], int]]) -> list:
        """`encode` of each (messages, supervise_from), with one tokenizer call for them all;
        a conversation that fails gives its SampleError in its place."""
        located = []
        for messages, supervise_from in conversations:
            try:
                located.append(self.locate(messages, supervise_from))
            except SampleError as exc:
                located.append(exc)
        texts = [item[0] for item in located if not isinstance(item, SampleError)]
        # Ids only where the offsets follow from them (see piece_offsets): faster.
        fast = self.piece_offsets is not None
        encode = self.backend.encode_batch_fast if fast else self.backend.encode_batch
        encodings = iter(encode(texts, add_special_tokens=False))
        results = []
        for item in located:
            if isinstance(item, SampleError):
                results.append(item)
                continue
            try:
                text, spans = item
                results.append(self._masked(next(encodings), text, spans))
            except SampleError as exc:
                results.append(exc)
        return results

    def _masked(self, encoding, text: str, spans: List[Tuple[int, int]]) -> EncodedSample:
        ids = encoding.ids
        if len(ids) < 2:
            raise SampleError("the conversation renders to fewer than 2 tokens")
        tokens = np.asarray(ids, dtype=np.int32)
        return self._shift_and_truncate(tokens, self._written(encoding, text, spans))

    def _written(self, encoding, text: str, spans: List[Tuple[int, int]]) -> np.ndarray:
        """Which tokens of `text`'s encoding an assistant wrote: from offsets computed from the
        ids where they can be, else from the tokenizer's (asked again where the encoding was
        made without them), bisected where they are ordered."""
        if self.piece_offsets is not None:
            bounds = self.piece_offsets.of(encoding.ids, len(text))
            if bounds is not None:
                return written_by_bounds(*bounds, spans)
            encoding = self.backend.encode(text, add_special_tokens=False)
        count = len(encoding.ids)
        if self.ordered_offsets:
            written = written_by_search(encoding, count, spans)
            if written is not None:
                return written
        return written_by_offsets(encoding.offsets, count, spans)

    def _shift_and_truncate(self, tokens: np.ndarray, written: np.ndarray) -> EncodedSample:
        labels = np.empty_like(tokens)
        labels[:-1] = tokens[1:]
        labels[-1] = self.eos_id  # never trained on: the mask below is 0 there
        loss_mask = np.zeros(len(tokens), dtype=np.uint8)
        loss_mask[:-1] = written[1:]  # position t is trained when token t + 1 is the assistant's
        truncated = len(tokens) > self.seq_length
        if truncated:
            keep = (
                slice(-self.seq_length, None)
                if self.truncation == "left"
                else slice(0, self.seq_length)
            )
            tokens, labels, loss_mask = tokens[keep], labels[keep], loss_mask[keep]
            loss_mask = loss_mask.copy()
            if self.truncation == "right":
                loss_mask[-1] = 0  # its label was the first cut-off token
        return EncodedSample(tokens, labels, loss_mask, truncated)


def written_by_offsets(offsets, count: int, spans: List[Tuple[int, int]]) -> np.ndarray:
    """Which tokens an assistant wrote: a token is when its characters overlap one of the
    spans (a piece merged across the boundary of a span counts as the assistant's); an empty
    piece (a == b) is when it sits inside one."""
    bounds = np.asarray(offsets, dtype=np.int64).reshape(count, 2)
    return written_by_bounds(bounds[:, 0], bounds[:, 1], spans)


def written_by_bounds(a: np.ndarray, b: np.ndarray, spans: List[Tuple[int, int]]) -> np.ndarray:
    """`written_by_offsets` of tokens starting at `a` and ending at `b`."""
    written = np.zeros(len(a), dtype=bool)
    for s, e in spans:
        written |= ((a < e) & (b > s)) | ((a == b) & (s <= a) & (a < e))
    return written


def written_by_search(encoding, count: int, spans: List[Tuple[int, int]]) -> Optional[np.ndarray]:
    """`written_by_offsets` for an encoding whose token offsets never decrease, reading only
    the offsets of the tokens a bisection visits (reading them all costs more than the rest of
    the masking); None where a token has no offsets."""
    try:
        written = np.zeros(count, dtype=bool)
        tokens = range(count)
        for s, e in spans:
            # The tokens overlapping [s, e) are those that end after s and start before e.
            first = bisect.bisect_right(tokens, s, key=lambda t: encoding.token_to_chars(t)[1])
            end = bisect.bisect_left(tokens, e, key=lambda t: encoding.token_to_chars(t)[0])
            # Empty pieces at s itself end at s: they sit inside the span too.
            while s < e and first > 0 and encoding.token_to_chars(first - 1) == (s, s):
                first -= 1
            written[first:end] = True
        return written
    except TypeError:  # token_to_chars gave None: a token without offsets
        return None


def check_messages(messages, roles: Optional[Tuple[str, ...]] = None) -> List[dict]:
    """A clean copy of a `messages` list, or SampleError naming what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise SampleError("`messages` must be a non-empty list")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise SampleError(f"messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or (roles and role not in roles):
            raise SampleError(f"messages[{i}].role={role!r}; use one of {list(roles or ())}")
        if not isinstance(content, str):
            raise SampleError(f"messages[{i}].content is not a string")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise SampleError("no assistant message: nothing to learn from")
    return clean
