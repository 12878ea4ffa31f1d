"""Two lm-eval tasks built offline from the pydoc demo corpus (`data/demo_corpus.py`).

`danube_demo_mc`: "which continuation follows this passage": a paragraph's first 24 words,
four choices of 12 words (its own next 12 words, and those of three other paragraphs); 300
items, the same on every machine with the same Python (each Python ships its own pydoc text).
Chance is 25%. `danube_demo_ppl`: rolling perplexity over 40 whole paragraphs.

`write_demo_tasks(folder)` writes each task's JSONL and YAML (`dataset_path: json` with the
data file's absolute path) into `folder`, an include path for lm-eval.
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List

MC_TASK, PPL_TASK = "danube_demo_mc", "danube_demo_ppl"
DEMO_TASKS = (MC_TASK, PPL_TASK)
PASSAGE_WORDS, CONTINUATION_WORDS = 24, 12
MC_ITEMS, PPL_DOCUMENTS, SEED = 300, 40, 1234

MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{passage}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PPL_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def multiple_choice_items() -> List[Dict[str, object]]:
    """The demo multiple-choice items (deterministic)."""
    from megatron_danube.data.demo_corpus import pydoc_paragraphs

    need = PASSAGE_WORDS + CONTINUATION_WORDS
    long_enough = [p.split() for p in pydoc_paragraphs() if len(p.split()) >= need]
    rng = random.Random(SEED)
    chosen = rng.sample(range(len(long_enough)), MC_ITEMS)
    endings = [" ".join(long_enough[i][PASSAGE_WORDS:need]) for i in chosen]
    items = []
    for n, index in enumerate(chosen):
        others = rng.sample([k for k in range(MC_ITEMS) if endings[k] != endings[n]], 3)
        choices = [endings[k] for k in others]
        label = rng.randrange(4)
        choices.insert(label, endings[n])
        passage = " ".join(long_enough[index][:PASSAGE_WORDS])
        items.append({"passage": passage, "choices": choices, "label": label})
    return items


def perplexity_documents() -> List[Dict[str, str]]:
    """Whole paragraphs for the rolling-perplexity task (deterministic)."""
    from megatron_danube.data.demo_corpus import pydoc_paragraphs

    paragraphs = [p for p in pydoc_paragraphs() if len(p) >= 200]
    picked = random.Random(SEED + 1).sample(range(len(paragraphs)), PPL_DOCUMENTS)
    return [{"text": paragraphs[i]} for i in sorted(picked)]


def write_demo_tasks(folder: str) -> str:
    """Both demo tasks' data and YAML in `folder` (rewritten only where they differ)."""
    folder = os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    for task, rows, template in (
        (MC_TASK, multiple_choice_items(), MC_YAML),
        (PPL_TASK, perplexity_documents(), PPL_YAML),
    ):
        data = os.path.join(folder, f"{task}.jsonl")
        _write_if_changed(data, "".join(json.dumps(r) + "\n" for r in rows))
        _write_if_changed(
            os.path.join(folder, f"{task}.yaml"), template.format(task=task, data=data)
        )
    return folder


def _write_if_changed(path: str, text: str) -> None:
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return
    tmp = f"{path}.tmp{os.getpid()}"  # ranks may write at once: each its own, then rename
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
