import json
import os

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def corpora(tmp_path_factory):
    """Two small real-text corpora (pydoc topics split in two), tokenised with mistral-v1."""
    from megatron_danube.data.demo_corpus import pydoc_paragraphs
    from megatron_danube.data.indexed import IndexedWriter
    from megatron_danube.data.tokenizer import load_tokenizer

    tok = load_tokenizer("mistral-v1")
    root = tmp_path_factory.mktemp("corpora")
    paras = list(pydoc_paragraphs())
    prefixes = []
    for i, part in enumerate((paras[0::2], paras[1::2])):
        prefix = str(root / f"part{i}_text_document")
        with IndexedWriter(prefix, tok.vocab_size) as w:
            for p in part:
                w.add_document(tok.encode(p) + [tok.eod])
        prefixes.append(prefix)
    return prefixes


def plan_error(*overrides, config="tests/training/tiny_run.yaml") -> str:
    """The one-line error the preflight gives this config, in this process (the command line
    shows it as `PROG: error: LINE`, exit 2; one launch per command family checks that)."""
    from megatron_danube.config import load_config
    from megatron_danube.errors import DanubeConfigError
    from megatron_danube.training.preflight import build_plan

    with pytest.raises(DanubeConfigError) as refused:
        build_plan(load_config(os.path.join(REPO, config), list(overrides)))
    line = str(refused.value)
    assert "\n" not in line, line
    return line


def pretrain_overrides(run_dir, corpora):
    """The blend overrides `run_pretrain` gives tiny_run.yaml."""
    return [
        f"run_dir={run_dir}",
        f"data.blend=[{corpora[0]}]",
        f"stages.1.blend=[0.3, {corpora[0]}, 0.7, {corpora[1]}]",
    ]


def train_losses(run_dir):
    """{iteration: loss} from metrics.jsonl (train records only)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["iteration"]] = rec["loss"]
    return out


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory):
    """An 800-piece SentencePiece model trained on the pydoc text: another vocabulary that a
    32,000-token model still accepts by size."""
    import sentencepiece

    from megatron_danube.data.demo_corpus import pydoc_paragraphs

    prefix = tmp_path_factory.mktemp("other_tokenizer") / "sp800"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(pydoc_paragraphs())[:2000]),
        model_prefix=str(prefix),
        vocab_size=800,
        minloglevel=2,
    )
    return f"{prefix}.model"


def hf_model(path, seed):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_danube.data.chat.template import DANUBE_TEMPLATE
    from megatron_danube.data.hf_tokenizer import save_hf_tokenizer
    from megatron_danube.data.tokenizer import load_tokenizer
    from megatron_danube.models.hf_adapter import hf_config_dict
    from megatron_danube.models.presets import get_preset

    torch.manual_seed(seed)
    config = MistralConfig(**hf_config_dict(get_preset("danube-tiny"), "float32"))
    MistralForCausalLM(config).save_pretrained(str(path))
    save_hf_tokenizer(load_tokenizer("mistral-v1"), str(path), chat_template=DANUBE_TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A random danube-tiny as an HF Mistral directory (tokenizer and chat template too)."""
    return hf_model(tmp_path_factory.mktemp("hf_start"), seed=0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Six preference pairs of the demo set, as JSONL."""
    from megatron_danube.data.demo_chat import preference_pairs

    train, _ = preference_pairs()
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(train[i]) + "\n" for i in (0, 5, 10, 17, 22, 29)))
    return str(path)
