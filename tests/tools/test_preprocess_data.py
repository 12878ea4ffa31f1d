"""tools/preprocess_data.py: round trip, determinism, partitions, bad input, interruption."""

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_danube.cli.preprocess import main as preprocess
from megatron_danube.data.demo_corpus import pydoc_paragraphs
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
    return [
        np.concatenate([ds[i] for i in range(idx[d], idx[d + 1])]).tolist()
        for d in range(len(idx) - 1)
    ]


def run(*args, tokenizer="mistral-v1"):
    return preprocess(["--no-progress", "--tokenizer-model", str(tokenizer), *map(str, args)])


def test_round_trip_equals_the_tokenizers_own_encoding(tmp_path, tok, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    assert (
        run("--input", src, "--output-prefix", tmp_path / "out", "--workers", 2, "--append-eod")
        == 0
    )
    got = read_docs(str(tmp_path / "out_text_document"))
    assert got == [tok.encode(d) + [tok.eod] for d in docs]


def test_every_input_format(tmp_path, tok, docs):
    part = docs[:50]
    write_jsonl(tmp_path / "a.jsonl", part)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in part)
    import zstandard

    with open(tmp_path / "c.jsonl.zst", "wb") as f:
        f.write(
            zstandard.ZstdCompressor().compress(
                "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
            )
        )
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
        assert (tmp_path / f"whole_text_document{ext}").read_bytes() == (
            tmp_path / f"parts_text_document{ext}"
        ).read_bytes()
    assert not list(tmp_path.glob("parts_part*"))  # intermediates removed


@pytest.mark.slow  # launches processes
def test_partition_index_for_slurm_arrays_then_merge_tool(tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    for i in range(2):
        run(
            "--input",
            src,
            "--output-prefix",
            tmp_path / "p",
            "--partitions",
            2,
            "--partition-index",
            i,
            "--workers",
            1,
        )
    run("--input", src, "--output-prefix", tmp_path / "whole", "--workers", 1)
    merged = tmp_path / "merged_text_document"
    subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "merge_datasets.py"),
            "--input",
            str(tmp_path / "p_part000_text_document"),
            str(tmp_path / "p_part001_text_document"),
            "--output-prefix",
            str(merged),
        ],
        check=True,
        capture_output=True,
    )
    assert read_docs(str(merged)) == read_docs(str(tmp_path / "whole_text_document"))


def test_bad_records_are_reported_with_file_and_line_and_skipped(tmp_path, capsys, tok):
    src = tmp_path / "bad.jsonl"
    with open(src, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b"{not json\n")  # line 2 malformed
        f.write(b'{"body": "no text key"}\n')  # line 3 missing key
        f.write(b'{"text": 17}\n')  # line 4 not a string
        f.write(b'{"text": "bad \xff byte"}\n')  # line 5 invalid utf-8
        f.write(b'{"text": "   "}\n')  # line 6 empty
        f.write(b'{"text": "good two"}\n')
    assert run("--input", src, "--output-prefix", tmp_path / "o", "--workers", 2) == 0
    err = capsys.readouterr().err
    for line, what in [
        (2, "malformed json"),
        (3, "missing key"),
        (4, "not a string"),
        (5, "invalid utf8"),
        (6, "empty"),
    ]:
        assert f"bad.jsonl:{line}: {what}" in err
    assert "skipped 5 bad records" in err
    assert read_docs(str(tmp_path / "o_text_document")) == [
        tok.encode("good one"),
        tok.encode("good two"),
    ]
    # --strict: fatal, and nothing written
    assert run("--input", src, "--output-prefix", tmp_path / "s", "--strict") == 2
    assert "bad.jsonl:2: malformed json (--strict)" in capsys.readouterr().err
    assert not list(tmp_path.glob("s_*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--tokenizer-model", "/nonexistent/tok.model"],
            "tokenizer '/nonexistent/tok.model' not found",
        ),
        (["--input", "/nonexistent.jsonl"], "no such file or directory"),
        (["--output-prefix", "/nonexistent-dir/x"], "does not exist"),
    ],
)
def test_bad_paths_fail_in_one_line_before_any_work(tmp_path, capsys, args, message):
    src = write_jsonl(tmp_path / "in.jsonl", ["a b c"])
    base = {
        "--input": src,
        "--output-prefix": str(tmp_path / "o"),
        "--tokenizer-model": "mistral-v1",
    }
    for k, v in zip(args[0::2], args[1::2], strict=True):
        base[k] = v
    argv = ["--no-progress"] + [x for kv in base.items() for x in kv]
    assert preprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_unreadable_tokenizer_file_is_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "tok.model"
    bogus.write_bytes(b"not a sentencepiece model")
    src = write_jsonl(tmp_path / "in.jsonl", ["a"])
    assert run("--input", src, "--output-prefix", tmp_path / "o", tokenizer=bogus) == 2
    assert "is not a readable SentencePiece model" in capsys.readouterr().err


def test_existing_output_is_never_overwritten_without_flag(tmp_path, capsys, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs[:5])
    assert run("--input", src, "--output-prefix", tmp_path / "o") == 0
    before = (tmp_path / "o_text_document.bin").read_bytes()
    assert run("--input", src, "--output-prefix", tmp_path / "o") == 2
    assert "already exist" in capsys.readouterr().err
    assert (tmp_path / "o_text_document.bin").read_bytes() == before


@pytest.mark.slow  # launches processes
def test_interrupted_run_leaves_no_complete_looking_output(tmp_path, docs):
    src = write_jsonl(tmp_path / "big.jsonl", docs * 60)
    proc = subprocess.Popen(
        [
            sys.executable,
            TOOL,
            "--input",
            src,
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-model",
            "mistral-v1",
            "--workers",
            "2",
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("o_text_document.tmp-*.bin")):
        time.sleep(0.01)
    assert list(tmp_path.glob("o_text_document.tmp-*.bin")), "the tool never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "o_text_document.idx").exists()
    assert not (tmp_path / "o_text_document.bin").exists()


def test_split_sentences_falls_back_to_untrained_punkt(tmp_path, caplog, monkeypatch, tok):
    import nltk.tokenize.punkt as punkt

    def no_punkt_data(lang):  # as where the trained punkt data is not installed
        raise LookupError(f"punkt_tab for {lang} not found")

    used = []
    real = punkt.PunktSentenceTokenizer

    class Untrained(real):
        def __init__(self, *a, **k):
            used.append(True)
            super().__init__(*a, **k)

    monkeypatch.setattr(punkt, "PunktTokenizer", no_punkt_data)
    monkeypatch.setattr(punkt, "PunktSentenceTokenizer", Untrained)
    text = "Mr. Smith went to Washington. He arrived at noon! Did he stay? Yes."
    src = write_jsonl(tmp_path / "in.jsonl", [text])
    assert (
        run("--input", src, "--output-prefix", tmp_path / "o", "--split-sentences", "--workers", 1)
        == 0
    )
    ds = IndexedDataset(str(tmp_path / "o_text_sentence"))
    assert used, "the untrained splitter was not used"
    assert "untrained Punkt" in caplog.text
    assert len(ds) > 1  # several sentences in one document
    assert len(ds.document_indices) == 2
    assert sum(len(ds[i]) for i in range(len(ds))) >= len(tok.encode(text)) - 4


def test_hf_tokenizer_directory(tmp_path, tok):
    from megatron_danube.data.hf_tokenizer import save_hf_tokenizer
    from megatron_danube.data.tokenizer import mistral_v1_model_path

    hf_dir = tmp_path / "hf_tok"
    # a working HF tokenizer directory: the one the HF export writes for this model
    save_hf_tokenizer(load_tokenizer(mistral_v1_model_path()), str(hf_dir))
    src = write_jsonl(tmp_path / "in.jsonl", ["Hello world.", "Second document here."])
    assert (
        run("--input", src, "--output-prefix", tmp_path / "o", "--append-eod", tokenizer=hf_dir)
        == 0
    )
    hf = load_tokenizer(str(hf_dir))
    assert read_docs(str(tmp_path / "o_text_document")) == [
        hf.encode("Hello world.") + [hf.eod],
        hf.encode("Second document here.") + [hf.eod],
    ]
    assert hf.encode("Hello world.") == tok.encode("Hello world.")  # a real tokenizer, not [1]


@pytest.mark.slow  # launches processes
def test_inspect_dataset_tool(tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs[:20])
    run("--input", src, "--output-prefix", tmp_path / "o")
    out = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "inspect_dataset.py"),
            str(tmp_path / "o_text_document"),
            "--tokenizer-model",
            "mistral-v1",
            "--show",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "20 documents" in out and "--- document 0" in out
    assert docs[0][:20] in out


def doc_count(prefix):
    """Documents in PREFIX.idx."""
    return len(IndexedDataset(str(prefix)).document_indices) - 1


def items(prefix):
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_keep_newlines_keeps_the_newlines_between_sentences(tmp_path, tok):
    text = "First sentence here.\nSecond one is here.\n\nThird. Fourth!\n"
    src = write_jsonl(tmp_path / "in.jsonl", [text])
    assert (
        run(
            "--input",
            src,
            "--output-prefix",
            tmp_path / "keep",
            "--split-sentences",
            "--keep-newlines",
            "--workers",
            1,
        )
        == 0
    )
    # Each sentence runs up to the next one, so the newlines after it are tokenised with it.
    kept = ["First sentence here.\n", "Second one is here.\n\n", "Third. ", "Fourth!"]
    assert items(tmp_path / "keep_text_sentence") == [tok.encode(s) for s in kept]
    newline = tok.encode("a\nb")[1]
    assert sum(ids.count(newline) for ids in items(tmp_path / "keep_text_sentence")) == 3
    # Without the flag punkt drops the whitespace between sentences, as before.
    assert (
        run(
            "--input",
            src,
            "--output-prefix",
            tmp_path / "drop",
            "--split-sentences",
            "--workers",
            1,
        )
        == 0
    )
    dropped = ["First sentence here.", "Second one is here.", "Third.", "Fourth!"]
    assert items(tmp_path / "drop_text_sentence") == [tok.encode(s) for s in dropped]


def test_keep_sequential_samples_partitions_keep_input_order(tmp_path, tok, docs):
    # The first partition ends inside a.jsonl: one file is cut by lines, the other whole.
    write_jsonl(tmp_path / "a.jsonl", docs[:250])
    write_jsonl(tmp_path / "b.jsonl", docs[250:300])
    assert (
        run(
            "--input",
            tmp_path / "a.jsonl",
            tmp_path / "b.jsonl",
            "--output-prefix",
            tmp_path / "o",
            "--partitions",
            2,
            "--keep-sequential-samples",
            "--workers",
            2,
        )
        == 0
    )
    assert read_docs(str(tmp_path / "o_text_document")) == [tok.encode(d) for d in docs[:300]]


def test_max_documents_counts_records_read_bad_ones_included(tmp_path, capsys, caplog, tok):
    src = tmp_path / "in.jsonl"
    with open(src, "w") as f:
        f.write(
            '{"text": "one"}\n{not json\n{"text": "two"}\n{"text": "three"}\n'
            '{"text": "four"}\n{"text": "five"}\n'
        )
    # The first 4 records: one, (malformed, read and skipped), two, three.
    assert (
        run("--input", src, "--output-prefix", tmp_path / "o", "--max-documents", 4, "--workers", 2)
        == 0
    )
    assert doc_count(tmp_path / "o_text_document") == 3
    assert read_docs(str(tmp_path / "o_text_document")) == [
        tok.encode(w) for w in ("one", "two", "three")
    ]
    assert "skipped 1 bad records" in capsys.readouterr().err
    assert "stopped after the first 4 input records" in caplog.text
    # Partitions run in turn and the limit carries over; the first holds 4 lines, so a limit of
    # 4 ends with it and one of 5 reads one record of the second.
    for limit, count in ((4, 3), (5, 4)):
        args = ("--input", src, "--max-documents", limit, "--workers", 1, "--overwrite")
        assert run(*args, "--output-prefix", tmp_path / "whole") == 0
        assert run(*args, "--output-prefix", tmp_path / "parts", "--partitions", 2) == 0
        assert doc_count(tmp_path / "parts_text_document") == count
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"whole_text_document{ext}").read_bytes() == (
                tmp_path / f"parts_text_document{ext}"
            ).read_bytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--max-documents", "0"], "--max-documents must be >= 1, got 0"),
        (["--max-documents", "-3"], "--max-documents must be >= 1, got -3"),
        (["--log-interval", "0"], "--log-interval must be >= 1, got 0"),
        (
            ["--max-documents", "2", "--partitions", "2", "--partition-index", "1"],
            "--max-documents counts from the start of the whole input",
        ),
    ],
)
def test_bad_new_flag_values_are_one_line_errors(tmp_path, capsys, args, message):
    src = write_jsonl(tmp_path / "in.jsonl", ["a b c"])
    assert run("--input", src, "--output-prefix", tmp_path / "o", *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not list(tmp_path.glob("o_*"))


@pytest.mark.slow  # launches processes
def test_log_interval_logs_progress_lines_to_stderr(tmp_path, caplog, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs * 2)  # 800 records: batches of 512 and 288
    proc = subprocess.run(
        [
            sys.executable,
            TOOL,
            "--input",
            src,
            "--output-prefix",
            str(tmp_path / "o"),
            "--tokenizer-model",
            "mistral-v1",
            "--workers",
            "1",
            "--no-progress",
            "--log-interval",
            "300",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    pattern = (
        r"^preprocess: ([\d,]+) documents, [\d,]+ tokens, [\d.]+ s elapsed "
        r"\([\d,]+ docs/s, [\d.]+ MB/s\)$"
    )
    counts = [m.group(1) for m in re.finditer(pattern, proc.stderr, re.M)]
    assert counts == ["512", "800"], proc.stderr
    # Without the flag: no progress lines.
    assert run("--input", src, "--output-prefix", tmp_path / "quiet", "--workers", 1) == 0
    assert "docs/s" not in caplog.text


def test_list_values_are_presplit_sentences(tmp_path, capsys, tok):
    src = tmp_path / "in.jsonl"
    sentences = ["Mr. Smith arrived. He left.", "  ", "Then it rained."]
    with open(src, "w") as f:
        f.write(json.dumps({"text": sentences}) + "\n")
        f.write(json.dumps({"text": ["fine", 3]}) + "\n")  # line 2: a non-string item
        f.write(json.dumps({"text": "A plain string."}) + "\n")
    said = [s for s in sentences if s.strip()]  # blank items are no sentences
    eod = tok.eod
    # Without --split-sentences: one document, each item tokenised, one item per document.
    assert run("--input", src, "--output-prefix", tmp_path / "d", "--append-eod") == 0
    err = capsys.readouterr().err
    assert "in.jsonl:2: not a string" in err and "skipped 1 bad records" in err
    assert doc_count(tmp_path / "d_text_document") == 2
    assert items(tmp_path / "d_text_document") == [
        tok.encode(said[0]) + tok.encode(said[1]) + [eod],
        tok.encode("A plain string.") + [eod],
    ]
    # With --split-sentences: the items are the sentences, never split again by punkt.
    assert (
        run("--input", src, "--output-prefix", tmp_path / "s", "--append-eod", "--split-sentences")
        == 0
    )
    err = capsys.readouterr().err
    assert "in.jsonl:2: not a string" in err and "skipped 1 bad records" in err
    ds = IndexedDataset(str(tmp_path / "s_text_sentence"))
    assert doc_count(tmp_path / "s_text_sentence") == 2
    assert [ds[i].tolist() for i in range(ds.document_indices[0], ds.document_indices[1])] == [
        tok.encode(said[0]),
        tok.encode(said[1]) + [eod],
    ]


def test_several_json_keys_stay_aligned_when_one_key_is_empty(tmp_path, capsys, caplog, tok):
    src = tmp_path / "in.jsonl"
    records = [
        {"text": "a b", "summary": "first"},
        {"text": "c d", "summary": " "},  # line 2: empty summary, kept
        {"text": "e f"},  # line 3: no summary, kept
        {"text": "", "summary": ""},  # line 4: no text at all, skipped
        {"text": "g", "summary": "last"},
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (
        run(
            "--input",
            src,
            "--output-prefix",
            tmp_path / "o",
            "--json-keys",
            "text",
            "summary",
            "--append-eod",
            "--workers",
            2,
        )
        == 0
    )
    eod = tok.eod
    text, summary = tmp_path / "o_text_document", tmp_path / "o_summary_document"
    assert doc_count(text) == doc_count(summary) == 4
    assert len(IndexedDataset(str(text))) == len(IndexedDataset(str(summary))) == 4
    assert read_docs(str(text)) == [tok.encode(t) + [eod] for t in ("a b", "c d", "e f", "g")]
    assert read_docs(str(summary)) == [
        tok.encode("first") + [eod],
        [eod],
        [eod],
        tok.encode("last") + [eod],
    ]
    assert "in.jsonl:4: empty" in capsys.readouterr().err
    assert "kept 2 records" in caplog.text
    assert "in.jsonl:2: empty under 'summary'" in caplog.text
    assert "in.jsonl:3: missing key under 'summary'" in caplog.text
    # One key: empty records are still skipped, not written.
    assert run("--input", src, "--output-prefix", tmp_path / "one", "--json-keys", "summary") == 0
    assert doc_count(tmp_path / "one_summary_document") == 2


def test_help_describes_every_megatron_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        preprocess(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in [
        "--keep-newlines with --split-sentences, keep the newlines",
        "--keep-sequential-samples accepted for Megatron-LM compatibility",
        "--max-documents N read only the first N input records",
        "--log-interval N log documents written",
        "a key that is empty or missing gets an empty document",
        "With one key, unlike Megatron-LM, empty records are skipped and reported",
    ]:
        assert phrase in text, phrase


def test_no_document_written_is_an_error_naming_the_keys_and_leaves_no_output(
    tmp_path, capsys, docs
):
    """Records keyed `content` under the default `--json-keys text`: exit 2, one line naming
    the key looked for and the keys the records have, and no empty dataset left behind."""
    src = write_jsonl(tmp_path / "in.jsonl", docs[:20], key="content")
    assert run("--input", src, "--output-prefix", tmp_path / "out") == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert line.startswith("danube-preprocess: error: no document written: 20 records")
    assert "--json-keys text" in line and "(their keys: content)" in line
    assert "wrote" not in err
    assert not os.path.exists(tmp_path / "out_text_document.bin")
    # the corrected command then runs without --overwrite
    assert run("--input", src, "--output-prefix", tmp_path / "out", "--json-keys", "content") == 0


def test_empty_input_is_an_error(tmp_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    assert run("--input", src, "--output-prefix", tmp_path / "out") == 2
    assert "the input holds no records" in capsys.readouterr().err


def test_help_states_the_default_json_key(capsys):
    with pytest.raises(SystemExit):
        preprocess(["--help"])
    assert "(default: text)" in capsys.readouterr().out


def test_training_on_a_dataset_without_documents_is_one_line_error(tmp_path):
    from megatron_danube.data.datasets import check_prefixes
    from megatron_danube.data.indexed import IndexedWriter
    from megatron_danube.errors import DanubeConfigError

    prefix = str(tmp_path / "empty_text_document")
    with IndexedWriter(prefix, 32000):
        pass
    with pytest.raises(DanubeConfigError, match=f"data.blend: {prefix} holds no documents"):
        check_prefixes([prefix])
