"""What a run reads, identified by content, recorded in every checkpoint, compared on resume.

Identity is by content, never by path: the tokenizer by its vocabulary (pieces in id order),
a chat template by its text, chat data by the bytes of its files in order. Two spellings of
one file are one input; a file rewritten in place is another. A run resuming from its own
checkpoints with other inputs is refused before anything is written, saved or pruned, naming
what changed and the two ways on; a run starting from another run's checkpoint must use the
tokenizer that checkpoint was trained with.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

from megatron_danube.config import RunConfig
from megatron_danube.errors import DanubeConfigError

# What each recorded input is called in messages: the setting that names it.
LABELS = {
    "tokenizer": "data.tokenizer (its vocabulary)",
    "chat.template": "chat.template (its text)",
    "chat.train": "chat.train (the files' contents)",
    "chat.valid": "chat.valid (the files' contents)",
}


def files_digest(paths: List[str]) -> str:
    """A hash of the inputs' bytes, in the order given (a saved dataset: its arrow files)."""
    from megatron_danube.data.chat.records import content_blocks

    outer = hashlib.sha256()
    for path in paths:
        inner = hashlib.sha256()
        for block in content_blocks(path):
            inner.update(block)
        outer.update(inner.digest())
    return outer.hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_inputs(
    tokenizer,
    template: Optional[str] = None,
    chat_files: Optional[Dict[str, List[str]]] = None,
) -> Dict[str, str]:
    """The identities of what this run reads: its tokenizer, and for chat runs the resolved
    template text and the data files by setting (`chat.train`, `chat.valid`)."""
    from megatron_danube.data.tokenizer import vocabulary_digest

    inputs = {"tokenizer": vocabulary_digest(tokenizer)}
    if template is not None:
        inputs["chat.template"] = text_digest(template)
    for name, paths in (chat_files or {}).items():
        inputs[name] = files_digest(paths)
    return inputs


def peek_train_state(path: str) -> Optional[dict]:
    """The train state of the checkpoint `path` names (itself, or a run dir's `latest`), read
    without verifying anything; None where there is none to read (the load reports why)."""
    from megatron_danube.training.checkpoint_format import STATE_FILE, read_pointer

    candidates = [path]
    for folder in (os.path.join(path, "checkpoints"), path):
        name = read_pointer(folder) if os.path.isdir(folder) else None
        if name:
            candidates.append(os.path.join(folder, name))
    for candidate in candidates:
        state_file = os.path.join(candidate, STATE_FILE)
        if os.path.isfile(state_file):
            try:
                with open(state_file) as f:
                    return json.load(f)
            except (OSError, ValueError):
                return None
    return None


def changed(saved: Dict[str, str], current: Dict[str, str]) -> List[str]:
    """The inputs recorded on both sides whose identities differ."""
    return [k for k in current if k in saved and saved[k] != current[k]]


def check_resume(cfg: RunConfig, inputs: Dict[str, str]) -> bool:
    """A run dir holding checkpoints must resume with the inputs they were trained on.
    Returns whether the run has checkpoints of its own (it then resumes from them alone)."""
    state = peek_train_state(os.path.join(cfg.run_dir, "checkpoints"))
    if not state or "inputs" not in state:
        return state is not None  # a checkpoint older than these records: not compared
    names = changed(state["inputs"], inputs)
    if names:
        what = ", ".join(LABELS.get(n, n) for n in names)
        raise DanubeConfigError(
            f"{cfg.run_dir} holds checkpoints trained on another {what}; nothing was changed "
            f"on disk. Restore the input, or start a new run: a new run_dir, with "
            f"checkpoint.load={cfg.run_dir} to continue from this one's weights"
        )
    return True


def check_start(source: Optional[str], inputs: Dict[str, str]) -> None:
    """A run starting from another run's checkpoint must use that run's tokenizer."""
    if not source:
        return
    state = peek_train_state(source)
    saved = (state or {}).get("inputs") or {}
    if state is None and os.path.isfile(os.path.join(source, "config.json")):
        saved = hf_directory_inputs(source)
    if "tokenizer" in saved and saved["tokenizer"] != inputs["tokenizer"]:
        recorded = (state or {}).get("tokenizer")
        hint = f" ({recorded})" if recorded else ""
        raise DanubeConfigError(
            f"checkpoint.load={source} was trained with another tokenizer (vocabulary "
            f"{saved['tokenizer']}, this run's {inputs['tokenizer']}); set data.tokenizer to "
            f"the one it was trained with{hint}"
        )


def hf_directory_inputs(path: str) -> Dict[str, str]:
    """An HF model directory's tokenizer identity, where it ships a tokenizer."""
    if not any(
        os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer.model")
    ):
        return {}
    from megatron_danube.data.tokenizer import load_tokenizer, vocabulary_digest

    try:
        return {"tokenizer": vocabulary_digest(load_tokenizer(path))}
    except DanubeConfigError:
        return {}  # not loadable here: the start's own checks report it
