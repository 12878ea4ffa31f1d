"""A small real English corpus present on every machine: Python's bundled pydoc topics.

The text of the language reference's help topics (about 0.5 MB), one document per paragraph,
tokenised on first use into a Megatron indexed dataset. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterator

from megatron_danube.data.indexed import IndexedWriter, dataset_exists

logger = logging.getLogger(__name__)


def pydoc_paragraphs(min_chars: int = 40) -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            para = para.strip()
            if len(para) >= min_chars:
                yield para


def ensure_demo_corpus(prefix: str, tokenizer) -> str:
    """Build `prefix.bin/.idx` from the pydoc topics unless it already exists."""
    if dataset_exists(prefix):
        return prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    logger.info("building the demo corpus %s from Python's pydoc topics (once)", prefix)
    documents = tokens = 0
    with IndexedWriter(prefix, tokenizer.vocab_size) as writer:
        for para in pydoc_paragraphs():
            ids = tokenizer.encode(para) + [tokenizer.eod]
            writer.add_document(ids)
            documents, tokens = documents + 1, tokens + len(ids)
    logger.info("demo corpus: %s documents, %s tokens", f"{documents:,}", f"{tokens:,}")
    return prefix
