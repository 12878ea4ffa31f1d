"""Conversion to and from HF, verified by logits; corrupt and mismatched inputs."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from megatron_danube.cli.convert import command as convert
from tests.conftest import REPO
from tests.launch import run_pretrain, torchrun

VOCAB = 1000  # padded to 1024 inside megatron


def tiny_hf_config(**changes):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    base.update(changes)
    return MistralConfig(**base)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MistralForCausalLM(tiny_hf_config())
    with torch.no_grad():  # non-trivial norms so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("hf") / "tiny-mistral"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mcore_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mc") / "mcore"
    assert convert(["--to", "mcore", "--load", str(hf_dir), "--save", str(out)]) == 0
    return out


@pytest.mark.slow  # launches processes
def test_hf_to_mcore_loads_at_tp2_pp2_with_hf_logits(hf_dir, mcore_dir, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = hf(input_ids=ids).logits  # 40 tokens, window 8: the window matters
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(logits, tmp_path / "logits.pt")
    out = tmp_path / "out.json"
    proc = torchrun(
        os.path.join(REPO, "tests", "tools", "convert_load_worker.py"),
        mcore_dir,
        tmp_path / "ids.pt",
        tmp_path / "logits.pt",
        out,
        nproc=4,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == 2  # both TP ranks of the last stage
    for r in results:
        assert r["shape"] == [2, 40, VOCAB]
        assert r["max_abs_diff"] < 1e-4, r


def test_hf_to_mcore_to_hf_is_bit_identical(hf_dir, mcore_dir, tmp_path):
    back = tmp_path / "back"
    assert (
        convert(["--to", "hf", "--load", str(mcore_dir), "--save", str(back), "--dtype", "float32"])
        == 0
    )
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        assert torch.equal(a[k], b[k]), k
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["sliding_window"] == 8 and cfg["vocab_size"] == VOCAB


@pytest.mark.slow  # launches processes
def test_training_checkpoint_at_tp2_to_hf_generates_and_matches(tmp_path, tmp_path_factory):
    from megatron_danube.convert.compare import compare
    from megatron_danube.data.demo_corpus import ensure_demo_corpus
    from megatron_danube.data.tokenizer import load_tokenizer

    tok = load_tokenizer("mistral-v1")
    prefix = ensure_demo_corpus(str(tmp_path / "corpus" / "pydoc_text_document"), tok)
    run_dir = tmp_path / "run"
    run_pretrain(
        run_dir,
        [prefix, prefix],
        "parallel.tensor_parallel=2",
        "train.train_tokens=512",
        "logging.eval_interval=0",
    )
    hf_out = tmp_path / "hf"
    assert (
        convert(["--to", "hf", "--load", str(run_dir), "--save", str(hf_out), "--dtype", "float32"])
        == 0
    )
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_out)  # what a transformers user gets
    for text in ("The import statement", "  déjà vu\n\tdef f(x):  return x**2  # 🐍", "日本語"):
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    text = "The import statement combines two operations: it searches for the named module"
    ids = hf_tok(text, return_tensors="pt").input_ids
    assert ids[0].tolist() == [tok.bos] + tok.encode(text) and ids.shape[1] >= 16
    model = AutoModelForCausalLM.from_pretrained(hf_out)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    result = compare(str(hf_out), str(run_dir), ids)
    assert result["max_abs_logit_diff"] < 1e-4, result
    assert result["top1_agreement"] == 1.0


def test_bf16_export_is_the_default(mcore_dir, tmp_path):
    out = tmp_path / "bf16"
    assert convert(["--to", "hf", "--load", str(mcore_dir), "--save", str(out)]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_sharded_safetensors_with_index(mcore_dir, tmp_path):
    from megatron_danube.convert.hf_export import to_hf

    out = tmp_path / "sharded"
    to_hf(str(mcore_dir), str(out), "float32", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((out / f).exists() for f in files)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4


@pytest.mark.parametrize(
    "change,message",
    [
        ({"tie_word_embeddings": True}, "ties embeddings"),
        ({"attention_bias": True}, "linear biases"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling"),
    ],
)
def test_unrepresentable_hf_models_are_one_line_errors(tmp_path, capsys, change, message):
    path = tmp_path / "hf"
    config = tiny_hf_config()
    config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    assert convert(["--to", "mcore", "--load", str(path), "--save", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_pickle_only_and_corrupt_hf_weights_are_refused(hf_dir, tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    assert convert(["--to", "mcore", "--load", str(pickled), "--save", str(tmp_path / "o1")]) == 2
    assert "only pickle (.bin) weights" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert convert(["--to", "mcore", "--load", str(corrupt), "--save", str(tmp_path / "o2")]) == 2
    assert "is corrupt or unreadable" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_mismatched_and_corrupt_megatron_inputs(mcore_dir, tmp_path, capsys):
    assert (
        convert(["--to", "hf", "--load", str(tmp_path / "missing"), "--save", str(tmp_path / "o")])
        == 2
    )
    assert "no such directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert(["--to", "hf", "--load", str(empty), "--save", str(tmp_path / "o")]) == 2
    assert "not a megatron_danube checkpoint" in capsys.readouterr().err
    # wrong model preset for the checkpoint
    assert (
        convert(
            [
                "--to",
                "hf",
                "--load",
                str(mcore_dir),
                "--save",
                str(tmp_path / "o"),
                "--model-preset",
                "danube-tiny",
            ]
        )
        == 2
    )
    assert "error" in capsys.readouterr().err
    # existing non-empty output is never touched
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    assert convert(["--to", "hf", "--load", str(mcore_dir), "--save", str(keep)]) == 2
    assert (keep / "precious.txt").read_text() == "x"
    # truncated shard data
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(mcore_dir, broken)
    for f in broken.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    assert convert(["--to", "hf", "--load", str(broken), "--save", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "is damaged" in err and ".distcp has 100 bytes" in err
    # the same size, one byte flipped: only the checksum can tell
    flipped = tmp_path / "flipped"
    shutil.copytree(mcore_dir, flipped)
    shard = sorted(flipped.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    assert convert(["--to", "hf", "--load", str(flipped), "--save", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err
    assert f"{shard} does not match its checksum" in err and err.count("\n") == 1
    assert not (tmp_path / "o4").exists()


def test_transformers_unaffected_by_cpu_compat_in_the_same_process(hf_dir, single_rank):
    """Regression: patching torch's factories globally zeroed transformers' RoPE inv_freq."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.model.rotary_emb.inv_freq.abs().min() > 0
    # torch's own factory, not a redirecting wrapper, outside megatron's modules
    assert torch.zeros is torch._C._VariableFunctions.zeros
