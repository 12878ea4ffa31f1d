"""Tokenizers for training and preprocessing: SentencePiece models and HF tokenizer folders.

`load_tokenizer(spec)` takes a SentencePiece `.model` file, an HF tokenizer directory, or the
name `mistral-v1`: the Mistral v1 SentencePiece model (32,000 pieces, the Danube2 tokenizer
family) that the `mistral-common` package ships, found at run time and never copied here.

The object has what megatron's GPTDataset needs (`vocab_size`, `eod`, `unique_identifiers`)
plus `encode`, `decode` and `encode_batch`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional

from megatron_danube.errors import DanubeConfigError

BUILTIN_TOKENIZERS = ("mistral-v1",)


def mistral_v1_model_path() -> str:
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise DanubeConfigError(
            "tokenizer 'mistral-v1' comes from the mistral-common package; "
            'pip install -e ".[demo]" (or pass a tokenizer .model path)'
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", "tokenizer.model.v1")
    if not os.path.isfile(path):
        raise DanubeConfigError(f"mistral-common is installed but has no {path}; upgrade it")
    return path


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        self.path = os.path.abspath(path)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except Exception as exc:
            raise DanubeConfigError(
                f"{path} is not a readable SentencePiece model ({exc}); "
                f"pass a tokenizer.model file or an HF tokenizer directory"
            ) from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.bos = self._sp.bos_id()
        if self.eod < 0:
            raise DanubeConfigError(f"SentencePiece model {path} defines no EOS token")

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: List[int]) -> str:
        return self._sp.decode(list(map(int, ids)))

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "SentencePieceTokenizer", "path": self.path, "vocab_size": self.vocab_size}

    def pieces(self) -> List[str]:
        """The vocabulary in id order."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]


class HFTokenizer:
    kind = "huggingface"

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DanubeConfigError(
                'HF tokenizer directories need transformers; pip install -e ".[hf]"'
            ) from None
        self.path = os.path.abspath(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:
            raise DanubeConfigError(
                f"{path} is not a loadable HF tokenizer directory ({type(exc).__name__}); "
                f"it needs tokenizer.json or tokenizer.model with tokenizer_config.json"
            ) from None
        self.vocab_size = len(self._tok)
        if self._tok.eos_token_id is None:
            raise DanubeConfigError(f"HF tokenizer {path} defines no eos_token")
        self.eod = self._tok.eos_token_id
        self.bos = self._tok.bos_token_id

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return self._tok(texts, add_special_tokens=False)["input_ids"]

    def decode(self, ids: List[int]) -> str:
        return self._tok.decode(list(map(int, ids)))

    @property
    def unique_identifiers(self) -> dict:
        return {"class": "HFTokenizer", "path": self.path, "vocab_size": self.vocab_size}

    def pieces(self) -> List[str]:
        """The vocabulary in id order."""
        return self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))


def vocabulary_digest(tokenizer) -> str:
    """The tokenizer's identity: a hash of its pieces in id order, whatever file or folder it
    was read from (an SP model and its HF export share one)."""
    import hashlib

    digest = hashlib.sha256()
    for piece in tokenizer.pieces():
        digest.update(piece.encode("utf-8", "surrogatepass") + b"\0")
    return f"{tokenizer.vocab_size}:{digest.hexdigest()[:16]}"


def resolve_tokenizer_path(spec: str) -> str:
    if spec == "mistral-v1":
        return mistral_v1_model_path()
    return spec


def load_tokenizer(spec: str, tokenizer_type: Optional[str] = None):
    """`tokenizer_type`: None (infer), 'sentencepiece' or 'huggingface' (Megatron-LM names too)."""
    if not spec:
        raise DanubeConfigError(
            "no tokenizer given; pass a .model file, an HF directory or mistral-v1"
        )
    path = resolve_tokenizer_path(spec)
    if not os.path.exists(path):
        raise DanubeConfigError(
            f"tokenizer {spec!r} not found; pass a SentencePiece .model file, an HF tokenizer "
            f"directory, or one of {BUILTIN_TOKENIZERS}"
        )
    kind = {
        None: None,
        "sentencepiece": "sentencepiece",
        "SentencePieceTokenizer": "sentencepiece",
        "GPTSentencePieceTokenizer": "sentencepiece",
        "Llama2Tokenizer": "sentencepiece",
        "huggingface": "huggingface",
        "HuggingFaceTokenizer": "huggingface",
    }.get(tokenizer_type, "unknown")
    if kind == "unknown":
        raise DanubeConfigError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; use SentencePieceTokenizer "
            f"or HuggingFaceTokenizer (or omit it to infer from the path)"
        )
    if kind is None:
        kind = "huggingface" if os.path.isdir(path) else "sentencepiece"
    if kind == "sentencepiece":
        if os.path.isdir(path):
            candidate = os.path.join(path, "tokenizer.model")
            if not os.path.isfile(candidate):
                raise DanubeConfigError(f"{path} is a directory without tokenizer.model")
            path = candidate
        return SentencePieceTokenizer(path)
    return HFTokenizer(path)
