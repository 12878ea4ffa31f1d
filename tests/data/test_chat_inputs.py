"""Chat inputs as users hold them: JSONL plain, .gz and .zst, and datasets saved with
`save_to_disk` give the same samples; reading streams; long and many-turn conversations."""

import gzip
import hashlib
import json
import shutil
import time
import tracemalloc

import numpy as np
import pytest

from megatron_danube.data.chat.dataset import encode_files, files_digest
from megatron_danube.data.chat.encoder import ChatEncoder
from megatron_danube.data.chat.records import BadRecords, check_files, read_records
from megatron_danube.data.chat.template import DANUBE_TEMPLATE
from megatron_danube.data.tokenizer import load_tokenizer
from megatron_danube.errors import DanubeConfigError
from megatron_danube.training import run_inputs

# Plain-text conversations (`messages`) and prompt/response records in one file: a saved
# dataset holds both as columns, each null where the other format is used.
MIXED = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there, what's 2+2?"},
            {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": " Thanks!\n"},
            {"role": "assistant", "content": "You're welcome émoji 🙂 \t tabs"},
        ]
    },
    {"prompt": "Name a prime.", "response": "7", "system": "Answer with a number."},
    {"prompt": "Name a colour.", "response": "Blue."},
    {"messages": [{"role": "user", "content": "no answer in this one"}]},  # a bad record
]
# TRL's conversational prompt/completion: message lists in both columns.
TRL_PROMPT_COMPLETION = [
    {
        "prompt": [{"role": "user", "content": f"Question {i}: what is {i} squared?"}],
        "completion": [{"role": "assistant", "content": f"It is {i * i}."}],
    }
    for i in range(5)
]
PAIRS = [
    {"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no", "rejected": "maybe"}
    for i in range(6)
]


@pytest.fixture(scope="module")
def encoder():
    return ChatEncoder(load_tokenizer("mistral-v1"), DANUBE_TEMPLATE, 2048)


def as_dataset(records):
    """The records as a `datasets.Dataset`, a column for every key any record has (null where
    a record lacks it), as `load_dataset("json", ...)` would make them."""
    import datasets

    keys = list(dict.fromkeys(k for r in records for k in r))
    return datasets.Dataset.from_dict({k: [r.get(k) for r in records] for k in keys})


def write_inputs(folder, records):
    """The same records as plain JSONL, .jsonl.gz, .jsonl.zst and a saved dataset."""
    import zstandard

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    plain, gz, zst = folder / "c.jsonl", folder / "c.jsonl.gz", folder / "c.jsonl.zst"
    plain.write_bytes(text)
    gz.write_bytes(gzip.compress(text))
    # two frames: a file concatenated from parts is read to its end
    half = text.index(b"\n") + 1
    compressor = zstandard.ZstdCompressor()
    zst.write_bytes(compressor.compress(text[:half]) + compressor.compress(text[half:]))
    saved = folder / "saved"
    as_dataset(records).save_to_disk(str(saved))
    return {"jsonl": plain, "gz": gz, "zst": zst, "saved": saved}


def assert_same_samples(a, b):
    for name in ("tokens", "labels", "loss_mask", "offsets"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("records", [MIXED, TRL_PROMPT_COMPLETION], ids=["mixed", "trl"])
def test_compressed_and_saved_dataset_inputs_encode_like_plain_jsonl(tmp_path, encoder, records):
    inputs = write_inputs(tmp_path, records)
    paths = {kind: check_files([str(p)], "chat.train") for kind, p in inputs.items()}
    samples = {kind: encode_files(p, encoder, "chat.train") for kind, p in paths.items()}
    assert len(samples["jsonl"]) == len([r for r in records if r is not MIXED[-1]])
    for kind in ("gz", "zst", "saved"):
        assert_same_samples(samples["jsonl"], samples[kind])
        assert samples[kind].stats["bad_records"] == samples["jsonl"].stats["bad_records"]


def test_a_bad_row_of_a_saved_dataset_is_named_by_its_row(tmp_path, encoder):
    saved = write_inputs(tmp_path, MIXED)["saved"]
    stats = encode_files([str(saved)], encoder, "chat.train").stats
    assert stats["bad_records"] == 1 and stats["records"] == 4
    assert stats["bad_examples"] == [f"{saved}:row 3: no assistant message: nothing to learn from"]
    plain = encode_files([str(tmp_path / "c.jsonl.gz")], encoder, "chat.train").stats
    assert plain["bad_examples"][0].startswith(f"{tmp_path / 'c.jsonl.gz'}:4: no assistant")


def test_preference_pairs_read_from_every_input_kind(tmp_path, encoder):
    inputs = write_inputs(tmp_path, PAIRS)
    plain = encode_files([str(inputs["jsonl"])], encoder, "chat.train", kind="dpo")
    assert len(plain) == 2 * len(PAIRS)
    for kind in ("gz", "zst", "saved"):
        assert_same_samples(
            plain, encode_files([str(inputs[kind])], encoder, "chat.train", kind="dpo")
        )


def test_a_saved_dataset_is_identified_by_its_rows(tmp_path):
    # one name in three folders: the cache key names its inputs by base name too
    first, again, other = (tmp_path / n / "saved" for n in ("first", "again", "other"))
    as_dataset(MIXED).save_to_disk(str(first))
    as_dataset(MIXED).map(lambda row: row).save_to_disk(str(again))  # a new fingerprint
    as_dataset(MIXED[:-1]).save_to_disk(str(other))
    # other rows under the first one's metadata: still other rows
    shutil.copy(first / "state.json", other / "state.json")
    shutil.copy(first / "dataset_info.json", other / "dataset_info.json")
    for digest in (run_inputs.files_digest, files_digest):
        assert digest([str(first)]) == digest([str(again)])
        assert digest([str(first)]) != digest([str(other)])


def test_a_plain_files_identity_is_unchanged(tmp_path):
    """Checkpoints and caches made before saved datasets were read keep matching their files."""
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n' * 1000)
    data = path.read_bytes()
    recorded = hashlib.sha256(hashlib.sha256(data).digest()).hexdigest()[:16]
    assert run_inputs.files_digest([str(path)]) == recorded
    cache = hashlib.sha256(b"c.jsonl\0" + data).hexdigest()
    assert files_digest([str(path)]) == cache


def test_a_dataset_dict_is_refused_naming_its_splits(tmp_path):
    import datasets

    split = as_dataset(TRL_PROMPT_COMPLETION)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DanubeConfigError) as exc:
        check_files([str(tmp_path / "dd")], "chat.train")
    message = str(exc.value)
    assert "\n" not in message and "DatasetDict" in message
    assert "train, test" in message and f"{tmp_path / 'dd' / 'train'}" in message
    assert check_files([str(tmp_path / "dd" / "train")], "chat.train")


@pytest.mark.parametrize(
    "name,expected",
    [("missing.jsonl", "does not exist"), ("folder", "not a dataset saved with save_to_disk")],
)
def test_a_missing_file_or_a_plain_directory_is_one_line(tmp_path, name, expected):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "c.jsonl").write_text("{}\n")
    with pytest.raises(DanubeConfigError) as exc:
        check_files([str(tmp_path / name)], "chat.train")
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert ".jsonl.gz" in str(exc.value)  # the fix: what to give instead


def big_conversation_line(i: int) -> bytes:
    words = " ".join(f"word{j % 97}" for j in range(2500))
    record = {"prompt": f"question {i}", "response": words}
    return (json.dumps(record) + "\n").encode()


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_large_compressed_file_is_streamed(tmp_path, suffix):
    """~200 MB of JSONL read with a few MB of Python memory: never read whole."""
    import zstandard

    path = tmp_path / f"big.jsonl{suffix}"
    line = big_conversation_line(0)
    copies = 200_000_000 // len(line)
    if suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=1) as f:
            for _ in range(copies):
                f.write(line)
    else:
        with zstandard.ZstdCompressor(level=1).stream_writer(open(path, "wb")) as f:
            for _ in range(copies):
                f.write(line)
    bad = BadRecords()
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_records([str(path)], bad))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == copies and bad.count == 0
    assert peak < 20_000_000, f"peak {peak / 1e6:.0f} MB of Python memory reading the file"


def test_a_saved_dataset_is_read_row_by_row(tmp_path):
    """A 60 MB saved dataset read with a few MB of Python memory (arrow is memory-mapped)."""
    import datasets

    response = big_conversation_line(0).decode()
    rows = {"prompt": [f"q{i}" for i in range(2400)], "response": [response] * 2400}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    del rows
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_records([str(tmp_path / "saved")], BadRecords()))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 2400
    assert peak < 20_000_000, f"peak {peak / 1e6:.0f} MB of Python memory reading the dataset"


def supervised_runs(sample):
    """The supervised label ids, as runs of consecutive positions."""
    runs, current = [], []
    for position, supervised in enumerate(sample.loss_mask):
        if supervised:
            current.append(int(sample.labels[position]))
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_a_16k_token_conversation_encodes_whole(encoder):
    tokenizer = load_tokenizer("mistral-v1")
    long_encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 16384)
    question = " ".join(f"token{i % 50}" for i in range(2400))
    answer = " ".join(f"reply{i % 50}" for i in range(3100))
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    sample = long_encoder.encode(messages)
    assert 15_000 < len(sample) <= 16384 and not sample.truncated
    (run,) = supervised_runs(sample)
    decoded = long_encoder.backend.decode(run, skip_special_tokens=False)
    assert decoded.strip() == f"{answer}</s>"


def test_a_100_turn_conversation_supervises_exactly_its_answers(encoder):
    messages = []
    for turn in range(100):
        messages.append({"role": "user", "content": f"Question {turn}: and then what happened?"})
        messages.append({"role": "assistant", "content": f"Then event {turn} happened, briefly."})
    started = time.perf_counter()
    sample = ChatEncoder(load_tokenizer("mistral-v1"), DANUBE_TEMPLATE, 16384).encode(messages)
    seconds = time.perf_counter() - started
    assert seconds < 10, f"a 100-turn conversation took {seconds:.1f} s to encode"
    runs = supervised_runs(sample)
    assert len(runs) == 100
    decoded = [encoder.backend.decode(r, skip_special_tokens=False).strip() for r in runs]
    assert decoded == [f"{m['content']}</s>" for m in messages[1::2]]
