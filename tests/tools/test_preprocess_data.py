"""tools/preprocess_data.py: round trip, determinism, partitions, bad input, interruption."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_danube.data.demo_corpus import pydoc_paragraphs
from megatron_danube.data.preprocess import main as preprocess
from megatron_danube.data.tokenizer import load_tokenizer
from tests.conftest import REPO

TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("mistral-v1")


@pytest.fixture(scope="module")
def docs():
    return list(pydoc_paragraphs())[:400]


def write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    idx = ds.document_indices
    return [np.concatenate([ds[i] for i in range(idx[d], idx[d + 1])]).tolist()
            for d in range(len(idx) - 1)]


def run(*args):
    return preprocess(["--no-progress", "--tokenizer-model", "mistral-v1", *map(str, args)])


def test_round_trip_equals_the_tokenizers_own_encoding(tmp_path, tok, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    assert run("--input", src, "--output-prefix", tmp_path / "out", "--workers", 2,
               "--append-eod") == 0
    got = read_docs(str(tmp_path / "out_text_document"))
    assert got == [tok.encode(d) + [tok.eod] for d in docs]


def test_every_input_format(tmp_path, tok, docs):
    part = docs[:50]
    write_jsonl(tmp_path / "a.jsonl", part)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    import zstandard
    with open(tmp_path / "c.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": d}) + "\n" for d in part).encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": part}), tmp_path / "d.parquet")
    flat = [d.replace("\n", " ") for d in part]
    (tmp_path / "e.txt").write_text("\n".join(flat) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    assert run("--input", tmp_path / "*.*", "--output-prefix", out / "all", "--workers", 2) == 0
    got = read_docs(str(out / "all_text_document"))
    expect = [tok.encode(d) for d in part] * 4 + [tok.encode(d) for d in flat]
    assert got == expect  # sorted file order: a, b, c, d, e


def test_one_and_many_workers_write_identical_files(tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    run("--input", src, "--output-prefix", tmp_path / "w1", "--workers", 1, "--append-eod")
    run("--input", src, "--output-prefix", tmp_path / "w3", "--workers", 3, "--append-eod")
    for ext in (".bin", ".idx"):
        a = (tmp_path / f"w1_text_document{ext}").read_bytes()
        assert a == (tmp_path / f"w3_text_document{ext}").read_bytes()


def test_partitions_split_one_file_by_lines_and_merge_identically(tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    run("--input", src, "--output-prefix", tmp_path / "whole", "--workers", 2)
    run("--input", src, "--output-prefix", tmp_path / "parts", "--workers", 2, "--partitions", 3)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"whole_text_document{ext}").read_bytes() == \
               (tmp_path / f"parts_text_document{ext}").read_bytes()
    assert not list(tmp_path.glob("parts_part*"))  # intermediates removed


def test_partition_index_for_slurm_arrays_then_merge_tool(tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    for i in range(2):
        run("--input", src, "--output-prefix", tmp_path / "p", "--partitions", 2,
            "--partition-index", i, "--workers", 1)
    run("--input", src, "--output-prefix", tmp_path / "whole", "--workers", 1)
    merged = tmp_path / "merged_text_document"
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_datasets.py"), "--input",
                    str(tmp_path / "p_part000_text_document"), str(tmp_path / "p_part001_text_document"),
                    "--output-prefix", str(merged)], check=True, capture_output=True)
    assert read_docs(str(merged)) == read_docs(str(tmp_path / "whole_text_document"))


def test_bad_records_are_reported_with_file_and_line_and_skipped(tmp_path, capsys, tok):
    src = tmp_path / "bad.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{not json\n')                      # line 2 malformed
        f.write(b'{"body": "no text key"}\n')        # line 3 missing key
        f.write(b'{"text": 17}\n')                   # line 4 not a string
        f.write(b'{"text": "bad \xff byte"}\n')      # line 5 invalid utf-8
        f.write(b'{"text": "   "}\n')                # line 6 empty
        f.write(b'{"text": "good two"}\n')
    assert run("--input", src, "--output-prefix", tmp_path / "o", "--workers", 2) == 0
    err = capsys.readouterr().err
    for line, what in [(2, "malformed json"), (3, "missing key"), (4, "not a string"),
                       (5, "invalid utf8"), (6, "empty")]:
        assert f"bad.jsonl:{line}: {what}" in err
    assert "skipped 5 bad records" in err
    assert read_docs(str(tmp_path / "o_text_document")) == [tok.encode("good one"),
                                                           tok.encode("good two")]
    # --strict: fatal, and nothing written
    assert run("--input", src, "--output-prefix", tmp_path / "s", "--strict") == 2
    assert "bad.jsonl:2: malformed json (--strict)" in capsys.readouterr().err
    assert not list(tmp_path.glob("s_*"))


@pytest.mark.parametrize("args,message", [
    (["--tokenizer-model", "/nonexistent/tok.model"], "tokenizer '/nonexistent/tok.model' not found"),
    (["--input", "/nonexistent.jsonl"], "no such file or directory"),
    (["--output-prefix", "/nonexistent-dir/x"], "does not exist"),
])
def test_bad_paths_fail_in_one_line_before_any_work(tmp_path, capsys, args, message):
    src = write_jsonl(tmp_path / "in.jsonl", ["a b c"])
    base = {"--input": src, "--output-prefix": str(tmp_path / "o"), "--tokenizer-model": "mistral-v1"}
    for k, v in zip(args[0::2], args[1::2]):
        base[k] = v
    argv = ["--no-progress"] + [x for kv in base.items() for x in kv]
    assert preprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unreadable_tokenizer_file_is_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "tok.model"
    bogus.write_bytes(b"not a sentencepiece model")
    src = write_jsonl(tmp_path / "in.jsonl", ["a"])
    assert preprocess(["--no-progress", "--input", src, "--output-prefix", str(tmp_path / "o"),
                       "--tokenizer-model", str(bogus)]) == 2
    assert "is not a readable SentencePiece model" in capsys.readouterr().err


def test_existing_output_is_never_overwritten_without_flag(tmp_path, capsys, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs[:5])
    assert run("--input", src, "--output-prefix", tmp_path / "o") == 0
    before = (tmp_path / "o_text_document.bin").read_bytes()
    assert run("--input", src, "--output-prefix", tmp_path / "o") == 2
    assert "already exist" in capsys.readouterr().err
    assert (tmp_path / "o_text_document.bin").read_bytes() == before


def test_interrupted_run_leaves_no_complete_looking_output(tmp_path, docs):
    src = write_jsonl(tmp_path / "big.jsonl", docs * 60)
    proc = subprocess.Popen([sys.executable, TOOL, "--input", src, "--output-prefix",
                             str(tmp_path / "o"), "--tokenizer-model", "mistral-v1",
                             "--workers", "2", "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("o_text_document.tmp-*.bin")):
        time.sleep(0.01)
    assert list(tmp_path.glob("o_text_document.tmp-*.bin")), "the tool never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "o_text_document.idx").exists()
    assert not (tmp_path / "o_text_document.bin").exists()


def test_split_sentences_falls_back_to_untrained_punkt(tmp_path, capsys, tok):
    text = "Mr. Smith went to Washington. He arrived at noon! Did he stay? Yes."
    src = write_jsonl(tmp_path / "in.jsonl", [text])
    assert run("--input", src, "--output-prefix", tmp_path / "o", "--split-sentences",
               "--workers", 1) == 0
    ds = IndexedDataset(str(tmp_path / "o_text_sentence"))
    assert len(ds) > 1  # several sentences in one document
    assert len(ds.document_indices) == 2
    assert sum(len(ds[i]) for i in range(len(ds))) >= len(tok.encode(text)) - 4


def test_hf_tokenizer_directory(tmp_path, tok):
    from transformers import LlamaTokenizer

    from megatron_danube.data.tokenizer import mistral_v1_model_path
    hf_dir = tmp_path / "hf_tok"
    LlamaTokenizer(vocab_file=mistral_v1_model_path(), legacy=True).save_pretrained(hf_dir)
    src = write_jsonl(tmp_path / "in.jsonl", ["Hello world.", "Second document here."])
    assert preprocess(["--no-progress", "--input", src, "--output-prefix", str(tmp_path / "o"),
                       "--tokenizer-model", str(hf_dir), "--append-eod"]) == 0
    hf = load_tokenizer(str(hf_dir))
    assert read_docs(str(tmp_path / "o_text_document")) == [
        hf.encode("Hello world.") + [hf.eod], hf.encode("Second document here.") + [hf.eod]]


def test_inspect_dataset_tool(tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs[:20])
    run("--input", src, "--output-prefix", tmp_path / "o")
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "inspect_dataset.py"),
                          str(tmp_path / "o_text_document"), "--tokenizer-model", "mistral-v1",
                          "--show", "1"], capture_output=True, text=True, check=True).stdout
    assert "20 documents" in out and "--- document 0" in out
    assert docs[0][:20] in out
