"""Write the run's tokenizer as a Hugging Face tokenizer directory that encodes like training did.

`save_hf_tokenizer(tokenizer, out_dir)` takes the object `load_tokenizer()` returns:

* an HF tokenizer directory is loaded with `AutoTokenizer` and saved again;
* a SentencePiece `.model` is turned into a `tokenizer.json` built here, straight from the model
  proto with the `tokenizers` library, plus a `tokenizer_config.json` naming
  `PreTrainedTokenizerFast`, and the `.model` copied as `tokenizer.model` for slow-tokenizer users.

Why not `LlamaTokenizer(vocab_file=...)` or transformers' `LlamaConverter`: their behaviour moves
between releases (transformers 5 builds an empty BPE from a `.model`, and its `LlamaTokenizer`
rebuilds the pipeline with a Metaspace pre-tokenizer that drops the extra `▁` SentencePiece puts
before text that starts with a space). `PreTrainedTokenizerFast` loads `tokenizer.json` as written
in transformers 4.x and 5.x, so the pipeline below is what every reader gets. It mirrors
`SentencePieceProcessor.encode(text)` on raw text: the "legacy" Llama scheme, i.e. normalise the
whole text, prepend `▁` (add_dummy_prefix), turn spaces into `▁`, no pre-tokenizer split.

Known limit shared with every HF Llama tokenizer: control pieces (`<s>`, `</s>`) written literally
in the text are read as special tokens by HF, while SentencePiece spells them out piece by piece.
For Unigram models, a literal "<0xNN>" in the text can come out as that byte piece when its
characters are not in the vocabulary (HF's Unigram cannot exclude pieces from the lattice).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from megatron_danube.errors import DanubeConfigError

log = logging.getLogger(__name__)

SPACE = "\u2581"  # SentencePiece's visible space, "▁"
INSTALL_HINT = 'pip install -e ".[hf]"'

# sentencepiece_model.proto: ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# sentencepiece_model.proto: TrainerSpec.ModelType
UNIGRAM, BPE = 1, 2


def save_hf_tokenizer(
    tokenizer,
    out_dir: str,
    *,
    chat_template: str | None = None,
    model_max_length: int | None = None,
) -> None:
    """Write `tokenizer` (from `load_tokenizer`) to `out_dir` as an HF tokenizer directory.

    `chat_template` goes into tokenizer_config.json; `model_max_length` (the model's context
    length, e.g. max_position_embeddings) too. Left out, HF treats the length as unbounded.
    """
    _require_hf()
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer.kind == "huggingface":
        _save_from_hf_dir(tokenizer.path, out_dir, chat_template, model_max_length)
    elif tokenizer.kind == "sentencepiece":
        _save_from_sentencepiece(tokenizer.path, out_dir, chat_template, model_max_length)
    else:
        raise DanubeConfigError(
            f"cannot export tokenizer kind {tokenizer.kind!r}; load it with load_tokenizer()"
        )
    log.info("wrote HF tokenizer (%s, from %s) to %s", tokenizer.kind, tokenizer.path, out_dir)


def _require_hf() -> None:
    # Fail with one actionable line instead of an ImportError deep inside the export.
    for module in ("transformers", "tokenizers", "google.protobuf"):
        try:
            __import__(module)
        except ImportError:
            name = "protobuf" if module.startswith("google") else module
            raise DanubeConfigError(
                f"exporting an HF tokenizer needs {name}, which is not installed; {INSTALL_HINT}"
            ) from None


# ----------------------------------------------------------------- HF tokenizer directory input


def _save_from_hf_dir(
    path: str, out_dir: str, chat_template: str | None, model_max_length: int | None
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    tok.save_pretrained(out_dir)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = _portable_config(json.load(f))
    saved_template = _pop_jinja_template(out_dir)
    template = chat_template if chat_template is not None else saved_template
    if template is not None:
        config["chat_template"] = template
    _write_json(config_path, config)


def _portable_config(config: dict) -> dict:
    """Undo what transformers 5 writes that transformers 4 cannot load or should not inherit."""
    if config.get("tokenizer_class") == "TokenizersBackend":
        # v5's name for a plain tokenizer.json tokenizer; v4 has no such class.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for load_time_only in ("is_local", "local_files_only"):
        config.pop(load_time_only, None)
    return config


def _pop_jinja_template(out_dir: str) -> str | None:
    """Take back the template newer transformers save to chat_template.jinja.

    4.45 reads templates only from tokenizer_config.json, and newer releases prefer the .jinja
    file over the config, so the config copy is the one that must exist and count.
    """
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if not os.path.exists(jinja):
        return None
    with open(jinja, encoding="utf-8") as f:
        template = f.read()
    os.remove(jinja)
    return template


# ------------------------------------------------------------------ SentencePiece model input


def _save_from_sentencepiece(
    model_path: str, out_dir: str, chat_template: str | None, model_max_length: int | None
) -> None:
    proto = _load_proto(model_path)
    backend = build_backend(proto)
    backend.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    config = _tokenizer_config(proto, chat_template, model_max_length)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), _special_tokens_map(proto))


def _load_proto(model_path: str):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def build_backend(proto):
    """A `tokenizers.Tokenizer` that encodes/decodes like SentencePiece on raw text."""
    from tokenizers import Tokenizer

    _check_supported(proto)
    backend = Tokenizer(_model(proto))
    backend.normalizer = _normalizer(proto.normalizer_spec)
    # No pre-tokenizer: SentencePiece runs BPE/Viterbi over the whole normalised string, and
    # whitespace-only pieces ("▁▁▁") must be able to form across what a splitter would cut.
    backend.decoder = _decoder(proto.normalizer_spec)
    backend.add_special_tokens(_added_tokens(proto, (UNKNOWN, CONTROL), special=True))
    backend.add_tokens(_added_tokens(proto, (USER_DEFINED,), special=False))
    bos = _piece_of(proto, proto.trainer_spec.bos_id)
    if bos is not None:
        # BOS only, never EOS: the Llama/Mistral convention training documents followed.
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, proto.trainer_spec.bos_id)],
        )
    return backend


def _check_supported(proto) -> None:
    trainer = proto.trainer_spec
    if trainer.model_type not in (BPE, UNIGRAM):
        raise DanubeConfigError(
            f"SentencePiece model type {trainer.model_type} (word/char) cannot be exported; "
            f"train the tokenizer with model_type=bpe or unigram"
        )
    if trainer.treat_whitespace_as_suffix:
        raise DanubeConfigError(
            "SentencePiece models trained with treat_whitespace_as_suffix cannot be exported; "
            "retrain without it or export an HF tokenizer directory instead"
        )


def _model(proto):
    from tokenizers import models

    unk_id = proto.trainer_spec.unk_id
    unk = _piece_of(proto, unk_id)
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == UNIGRAM:
        vocab = [(p.piece, _unigram_score(p)) for p in proto.pieces]
        return models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # fuse_unk: SentencePiece merges a run of unknown characters into one <unk>.
    return models.BPE(
        vocab=vocab,
        merges=bpe_merges(proto),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=byte_fallback,
        dropout=None,
    )


def _unigram_score(piece) -> float:
    # SentencePiece never matches byte/control/unknown pieces against text; HF's Unigram does,
    # so a score far below any real piece makes them lose to spelling "<0x41>" out. (HF also
    # derives its unknown-char penalty from the lowest score; unknown chars are unavoidable
    # in every path, so the penalty shifts all paths alike and the choice is unchanged.)
    return piece.score if piece.type in (NORMAL, USER_DEFINED) else -1e9


def bpe_merges(proto) -> list[tuple[str, str]]:
    """Merges ranked the way SentencePiece BPE applies them: by the merged piece's score.

    A SentencePiece BPE model stores no merge list; encoding repeatedly joins the adjacent pair
    whose concatenation is the best-scoring piece. Every split of a piece into two pieces is thus
    a merge, ranked by the result's score (ties: lower id first, as SentencePiece ids follow
    score order), then by the parts' ids to keep the order deterministic.
    """
    ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, piece_id in ids.items():
        score = proto.pieces[piece_id].score
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, piece_id, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(spec):
    """SentencePiece's normaliser, in its order: charsmap, whitespace clean-up, dummy prefix."""
    from tokenizers import Regex, normalizers

    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # Only U+0020 counts (after the charsmap): tabs and newlines survive, unlike Strip().
        # \A/\z, not ^/$: Oniguruma's ^/$ also match at every newline, which would eat the
        # spaces around each "\n" ("a \n b") that SentencePiece keeps.
        steps.append(normalizers.Replace(Regex(r"\A +| +\z"), ""))
        steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    if spec.add_dummy_prefix:
        # Prepend always, even before a leading space (" hi" -> "▁▁hi"): the Metaspace
        # pre-tokenizer would skip it there, which is why it is not used.
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def _decoder(spec):
    from tokenizers import decoders

    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        # SentencePiece's decode drops one leading space (the dummy prefix) under either flag.
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _added_tokens(proto, types, special: bool):
    from tokenizers import AddedToken

    return [
        AddedToken(p.piece, special=special, normalized=False)
        for p in proto.pieces
        if p.type in types
    ]


def _piece_of(proto, piece_id: int) -> str | None:
    return proto.pieces[piece_id].piece if 0 <= piece_id < len(proto.pieces) else None


def _special_tokens_map(proto) -> dict[str, str]:
    trainer = proto.trainer_spec
    named = {
        "bos_token": trainer.bos_id,
        "eos_token": trainer.eos_id,
        "unk_token": trainer.unk_id,
        "pad_token": trainer.pad_id,
    }
    return {
        name: _piece_of(proto, i) for name, i in named.items() if _piece_of(proto, i) is not None
    }


def _tokenizer_config(proto, chat_template: str | None, model_max_length: int | None) -> dict:
    config = {
        # PreTrainedTokenizerFast reads tokenizer.json as written in transformers 4 and 5;
        # LlamaTokenizerFast would be rebuilt (v5) or re-converted from the .model (v4).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_tokens_map(proto),
        "add_bos_token": True,
        "add_eos_token": False,
        # Cleanup would turn "a ." into "a." on decode; SentencePiece does no such thing.
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "added_tokens_decoder": _added_tokens_decoder(proto),
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def _added_tokens_decoder(proto) -> dict[str, dict]:
    kinds = {UNKNOWN: True, CONTROL: True, USER_DEFINED: False}
    return {
        str(i): {
            "content": p.piece,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": kinds[p.type],
        }
        for i, p in enumerate(proto.pieces)
        if p.type in kinds
    }


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
