"""Token character offsets computed from token ids, for the tokenizer pipeline this package
builds from a SentencePiece BPE model with byte fallback (`hf_tokenizer.build_backend`).

The tokenizer's offsets are most of what an `Encoding` costs beyond the ids: encoding
without them (`encode_batch_fast`) and computing them here from the ids is faster, and gives
the same offsets for that pipeline, which is simple enough to follow exactly:

- added tokens (`<unk>`, `<s>`, `</s>`) are cut out of the text first and cover their own
  characters; the text between them is a segment;
- a segment is normalised by prepending one `▁` and replacing each space with `▁`, so every
  normalised character but the first stands for one character of the text, and the first
  stands for the segment's first character too;
- BPE runs over the whole normalised segment (no pre-tokenizer), and byte-fallback pieces
  carry one byte each: all the bytes of a character cover that character.

A text whose computed offsets do not end at its length gives None, and its caller asks the
tokenizer for offsets instead.
"""

from __future__ import annotations

import json
from typing import Optional, Tuple

import numpy as np

PREFIX = "\u2581"
NORMALIZER = {
    "type": "Sequence",
    "normalizers": [
        {"type": "Prepend", "prepend": PREFIX},
        {"type": "Replace", "pattern": {"String": " "}, "content": PREFIX},
    ],
}


class PieceOffsets:
    """Offsets of a token id sequence: per id, the characters it adds to the normalised
    segment, whether it is a UTF-8 continuation byte, and (added tokens) its own length."""

    def __init__(self, lengths: np.ndarray, continuation: np.ndarray, added: np.ndarray):
        self.lengths = lengths  # normalised characters of a model piece
        self.continuation = continuation  # a byte-fallback piece of a character's later byte
        self.added = added  # characters of an added token, -1 for a model piece

    @classmethod
    def for_backend(cls, backend) -> Optional[PieceOffsets]:
        """The offsets of `backend`'s pipeline, or None where it is not the one modelled."""
        state = json.loads(backend.to_str())
        model = state.get("model") or {}
        plain = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
        if (
            state.get("normalizer") != NORMALIZER
            or state.get("pre_tokenizer") is not None
            or model.get("type") != "BPE"
            or not model.get("byte_fallback")
            # an added token that eats spaces or is matched after normalisation moves offsets
            or any({k: t.get(k) for k in plain} != plain for t in state.get("added_tokens", []))
        ):
            return None
        size = backend.get_vocab_size(with_added_tokens=True)
        lengths = np.zeros(size, dtype=np.int64)
        continuation = np.zeros(size, dtype=bool)
        added = np.full(size, -1, dtype=np.int64)
        for piece, index in backend.get_vocab(with_added_tokens=False).items():
            byte = _fallback_byte(piece)
            if byte is None:
                lengths[index] = len(piece)
            else:  # a character's first byte stands for it; its later bytes add nothing
                continuation[index] = 0x80 <= byte < 0xC0
                lengths[index] = 0 if continuation[index] else 1
        for index, token in backend.get_added_tokens_decoder().items():
            added[index] = len(token.content)
        return cls(lengths, continuation, added)

    def of(self, ids, text_length: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(starts, ends) of each token in the text, as the tokenizer gives them; None where
        they do not add up to the text's length (byte fallback leaves no unknown piece, so
        that is never expected)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return None
        added = self.added[ids]
        is_added = added >= 0
        advance = np.where(is_added, added, self.lengths[ids])
        # A segment's first piece holds the prepended `▁`, which is no character of its own.
        first = ~is_added & np.concatenate(([True], is_added[:-1]))
        advance[first] -= 1
        ends = np.cumsum(advance)
        starts = ends - advance
        # ... but it covers the segment's first character (a lone prepended `▁` included).
        ends[first] = np.maximum(ends[first], starts[first] + 1)
        # A character's later bytes cover that character, as its first byte does.
        later = self.continuation[ids]
        starts[later] = ends[later] - 1
        if ends[-1] != text_length or (advance < 0).any():
            return None
        return starts, ends


def _fallback_byte(piece: str) -> Optional[int]:
    """The byte of a byte-fallback piece (`<0x0A>`), else None."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None
