"""Small chat sets built offline: questions about Python's pydoc topics, answered by their text.

Every topic of the bundled `pydoc_data` gets its opening sentences as the answer. Training
conversations ask with four phrasings (some with a system prompt, some two topics in two
turns); the held-out set asks about the same topics with phrasings training never saw, so
its masked loss measures whether the model learned to answer, not to recite the questions.
The preference pairs ask the same questions with the topic's own answer chosen and another
topic's answer rejected.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Tuple

SYSTEM = "You answer questions about Python from its reference manual."
TRAIN_QUESTIONS = (
    "What is {topic} in Python?",
    "Explain {topic}.",
    "Tell me about {topic}.",
    "Describe {topic} briefly.",
)
VALID_QUESTIONS = ("What does the Python reference say about {topic}?",)
MAX_ANSWER_CHARS = 200


def topic_answers(min_chars: int = 40) -> Dict[str, str]:
    """Topic title -> the first sentences of its text (at most MAX_ANSWER_CHARS)."""
    from pydoc_data.topics import topics

    answers = {}
    for name in sorted(topics):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", topics[name]) if p.strip()]
        # Skip titles: a paragraph with a line of only underline characters is a heading.
        body = [p for p in paragraphs if not re.search(r"(?m)^[*=~^-]{3,}$", p)]
        if not body:
            continue
        text = " ".join(body[0].split())
        sentences = re.split(r"(?<=[.!?])\s+", text)
        answer = ""
        for sentence in sentences:
            if answer and len(answer) + len(sentence) + 1 > MAX_ANSWER_CHARS:
                break
            answer = f"{answer} {sentence}".strip()
        answer = answer[:MAX_ANSWER_CHARS]
        if len(answer) >= min_chars:
            answers[name.replace("-", " ")] = answer
    return answers


def conversations() -> Tuple[List[dict], List[dict]]:
    """(training records, held-out records) in the `messages` format."""
    answers = topic_answers()
    topics = list(answers)
    train, valid = [], []
    for i, topic in enumerate(topics):
        for j, question in enumerate(TRAIN_QUESTIONS):
            messages = [
                {"role": "user", "content": question.format(topic=topic)},
                {"role": "assistant", "content": answers[topic]},
            ]
            if (i + j) % 3 == 0:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            if (i + j) % 5 == 0:
                other = topics[(i + 1) % len(topics)]
                messages += [
                    {"role": "user", "content": TRAIN_QUESTIONS[0].format(topic=other)},
                    {"role": "assistant", "content": answers[other]},
                ]
            train.append({"messages": messages})
        for question in VALID_QUESTIONS:
            valid.append({"prompt": question.format(topic=topic), "response": answers[topic]})
    return train, valid


def preference_pairs() -> Tuple[List[dict], List[dict]]:
    """(training pairs, held-out pairs): the topic's own answer chosen, the next topic's
    answer rejected; questions phrased as in `conversations`."""
    answers = topic_answers()
    topics = list(answers)
    train, valid = [], []
    for i, topic in enumerate(topics):
        wrong = answers[topics[(i + 7) % len(topics)]]
        for question in TRAIN_QUESTIONS:
            q = question.format(topic=topic)
            train.append({"prompt": q, "chosen": answers[topic], "rejected": wrong})
        for question in VALID_QUESTIONS:
            q = question.format(topic=topic)
            valid.append({"prompt": q, "chosen": answers[topic], "rejected": wrong})
    return train, valid


def _write_jsonl(path: str, records: List[dict]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # concurrent builders (one per rank) write the same bytes


def ensure_demo_chat(out_dir: str) -> List[str]:
    """Conversations (`train.jsonl`, `valid.jsonl`) and preference pairs (`pairs_train.jsonl`,
    `pairs_valid.jsonl`) in `out_dir`, each built unless it exists."""
    builders = {"train": conversations, "pairs_train": preference_pairs}
    paths = []
    for name, build in builders.items():
        train_path = os.path.join(out_dir, f"{name}.jsonl")
        valid_path = train_path.replace("train.jsonl", "valid.jsonl")
        if not (os.path.exists(train_path) and os.path.exists(valid_path)):
            os.makedirs(out_dir, exist_ok=True)
            train, valid = build()
            _write_jsonl(train_path, train)
            _write_jsonl(valid_path, valid)
        paths += [train_path, valid_path]
    return paths
