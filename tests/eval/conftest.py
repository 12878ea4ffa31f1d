"""A random danube-tiny (the demo's shapes and tokenizer) as a megatron_danube checkpoint and as
its HF export, and the offline tasks the evaluation tests score."""

import os

import pytest
import torch

from megatron_danube.cli.convert import command as convert

GENERATION_TASK = "danube_test_gen"
GENERATION_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{passage}}}}"
doc_to_target: "{{{{choices[label]}}}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(megatron checkpoint dir, HF export dir): random weights, danube-tiny's shapes."""
    from transformers import MistralConfig, MistralForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config)
    with torch.no_grad():  # non-trivial norms, and logits spread enough to rank choices
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        model.lm_head.weight.mul_(8)
    model.save_pretrained(root / "random")
    mcore, hf = root / "mcore", root / "hf"
    assert convert(["--to", "mcore", "--load", str(root / "random"), "--save", str(mcore)]) == 0
    args = ["--to", "hf", "--load", str(mcore), "--save", str(hf), "--dtype", "float32"]
    assert convert(args + ["--tokenizer", "mistral-v1"]) == 0
    return mcore, hf


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """The demo tasks and a generation task over the demo items."""
    from megatron_danube.eval.demo_tasks import MC_TASK, write_demo_tasks

    folder = write_demo_tasks(str(tmp_path_factory.mktemp("tasks")))
    data = os.path.join(folder, f"{MC_TASK}.jsonl")
    with open(os.path.join(folder, f"{GENERATION_TASK}.yaml"), "w") as f:
        f.write(GENERATION_YAML.format(task=GENERATION_TASK, data=data))
    return folder
