"""What the SLURM tests share."""

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The demo corpus, built once for every SLURM test."""
    from megatron_danube.data.demo_corpus import ensure_demo_corpus
    from megatron_danube.data.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("corpus") / "pydoc_text_document"
    return ensure_demo_corpus(str(path), load_tokenizer("mistral-v1"))
