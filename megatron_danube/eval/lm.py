"""The Megatron model as an lm-eval model, registered as `danube`.

A `TemplateLM`, so lm-eval's own code splits context and continuation into tokens; encoding
follows lm-eval's `hf` model on a Llama/Mistral tokenizer: BOS first unless asked not to (or
the text already starts with it), the prefix for an empty context is BOS (EOS where there is
none), and over-long inputs lose tokens on the left. Scores come from `scoring.ForwardScorer`
at the model's layout.

lm-eval sees one process (rank 0 of 1) on every rank: each rank builds the same requests, the
scorer shares the work among the data-parallel replicas and gives every rank every answer, so
lm-eval's metrics come out the same everywhere and rank 0 reports them.

Generation is greedy and recomputes the whole sequence for each new token (no KV cache).
"""

from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megatron_danube.eval.scoring import ForwardScorer, Row

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's `hf` model's default


@register_model("danube")
class DanubeLM(TemplateLM):
    """`lm_eval --model danube --model_args load=RUN_OR_CHECKPOINT[,tokenizer=...,
    batch_size=N,max_length=N,parallel.tensor_parallel=2,...]`, or built around a model
    already loaded (`DanubeLM.around(loaded, ...)`)."""

    def __init__(
        self,
        load: Optional[str] = None,
        tokenizer: Optional[str] = None,
        batch_size=1,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: Optional[bool] = None,
        loaded=None,
        **settings,
    ):
        super().__init__()
        if loaded is None:
            loaded = _load_from_arguments(load, tokenizer, settings)
        self.loaded = loaded
        self.danube_tokenizer = loaded.tokenizer
        bos = loaded.tokenizer.bos
        self.bos_id = bos if bos is not None and bos >= 0 else None
        self.add_bos_token = (self.bos_id is not None) if add_bos_token is None else add_bos_token
        self._max_length = int(max_length or loaded.model.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = _batch_size(batch_size)
        self.scorer = ForwardScorer(loaded.chunks, loaded.model.vocab_size, self.batch_size)

    @classmethod
    def around(cls, loaded, **options) -> DanubeLM:
        """The lm-eval model of a model already in memory (a `LoadedModel`, or the trainer's
        chunks with their tokenizer)."""
        return cls(loaded=loaded, **options)

    # ------------------------------------------------------------------------ tokenisation
    @property
    def eot_token_id(self) -> int:
        return self.danube_tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None, **kw
    ) -> List[int]:
        add_bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and self._starts_with_bos(string):
            add_bos = False  # the text brings its own
        ids = list(self.danube_tokenizer.encode(string))
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens) -> str:
        return self.danube_tokenizer.decode(list(tokens))

    def _starts_with_bos(self, string: str) -> bool:
        if self.bos_id is None:
            return False
        text = getattr(self, "_bos_text", None)
        if text is None:
            pieces = getattr(self.danube_tokenizer, "pieces", None)
            text = self._bos_text = pieces()[self.bos_id] if pieces else ""
        return bool(text) and string.startswith(text)

    # ------------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(log p(continuation | context), greedy) per (key, context ids, continuation ids)."""
        rows = []
        for _, context, continuation in requests:
            if not context or not continuation:
                raise ValueError("lm-eval gave an empty context or continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            tokens = whole[:-1]
            rows.append(Row(tokens, whole[1:], len(tokens) - len(continuation)))
        scores = self.scorer.score(rows)
        return [(s.logprob, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """A whole text's log-likelihood in windows of `max_length` tokens, each predicted
        token counted once (lm-eval's rolling windows, one token of context)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: List[Tuple[int, list, list]] = []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((index, context, continuation))
        scores = self._loglikelihood_tokens([(None, c, t) for _, c, t in windows])
        totals = [0.0] * len(requests)
        for (index, _, _), (logprob, _) in zip(windows, scores):
            totals[index] += logprob
        return totals

    # ------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from megatron_danube.eval.generation import GreedyRequest, generate_greedy

        eos_text = self.tok_decode([self.eot_token_id])
        work = []
        for context, gen_kwargs in (req.args for req in requests):
            options = dict(gen_kwargs or {})
            if options.get("do_sample") and float(options.get("temperature", 0) or 0) > 0:
                raise ValueError("the danube model generates greedily; do_sample is not supported")
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            budget = int(options.get("max_gen_toks", self.max_gen_toks))
            if budget >= self.max_length:
                raise ValueError(f"max_gen_toks={budget} leaves no room below {self.max_length}")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - budget)
            work.append(GreedyRequest(ids, budget, tuple(s for s in until if s)))
        generated = generate_greedy(self.scorer, work, self.tok_decode, self.eot_token_id)
        return [_cut_at_stops(self.tok_decode(ids), req.stops) for ids, req in zip(generated, work)]


def _cut_at_stops(text: str, stops) -> str:
    """The text before the first occurrence of each stop string, applied in turn."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _batch_size(value) -> int:
    if isinstance(value, str) and not value.isdigit():
        raise ValueError(f"batch_size={value!r}; give a number of rows per micro-batch")
    return max(1, int(value))


def _load_from_arguments(load, tokenizer, settings):
    """What `lm_eval --model danube --model_args ...` asks for: section.key settings (the
    layout, the device) as config overrides; lm-eval's own `device` and `max_batch_size` are
    not ours to use."""
    from megatron_danube.config import load_config
    from megatron_danube.eval.loading import check_checkpoint, load_checkpoint

    for unused in ("device", "max_batch_size"):
        settings.pop(unused, None)
    overrides = [f"{key}={value}" for key, value in settings.items()]
    cfg = load_config(None, overrides)
    return load_checkpoint(check_checkpoint(load, cfg, tokenizer), cfg)
