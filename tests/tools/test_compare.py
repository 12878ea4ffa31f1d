"""The comparison refuses prompts too short to tell a working export from a broken one."""

import pytest

from megatron_danube.convert.compare import DEFAULT_PROMPTS, MIN_PROMPT_TOKENS, encode_prompts
from megatron_danube.data.tokenizer import load_tokenizer
from megatron_danube.errors import DanubeConfigError


def test_default_prompts_are_long_enough_and_cut_to_the_shortest():
    tok = load_tokenizer("mistral-v1")
    ids = encode_prompts(tok, DEFAULT_PROMPTS)
    assert ids.shape[0] == 2 and ids.shape[1] >= MIN_PROMPT_TOKENS
    assert ids[0, 0].item() == tok.bos


def test_short_prompt_is_refused():
    tok = load_tokenizer("mistral-v1")
    with pytest.raises(
        DanubeConfigError, match="encodes to 3 tokens; a comparison needs at least 16"
    ):
        encode_prompts(tok, ["Hello there", DEFAULT_PROMPTS[0]])


def test_a_tokenizer_that_maps_everything_to_bos_is_refused():
    class Broken:  # what a broken export's tokenizer did: every text -> nothing but BOS
        bos = 1

        def encode(self, text):
            return []

    with pytest.raises(DanubeConfigError, match="check the tokenizer"):
        encode_prompts(Broken(), DEFAULT_PROMPTS)
