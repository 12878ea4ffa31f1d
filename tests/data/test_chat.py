"""Chat data: template ids equal HF `apply_chat_template`, masks by position, packing bounds."""

import json
import os

import numpy as np
import pytest

from megatron_danube.data.chat.dataset import ChatSamples, encode_files, load_or_build
from megatron_danube.data.chat.encoder import ChatEncoder, SampleError
from megatron_danube.data.chat.packing import (
    bfd_packs,
    epoch_packs,
    fill_rate,
    greedy_packs,
    packed_microbatch,
)
from megatron_danube.data.chat.records import BadRecords, messages_of
from megatron_danube.data.chat.template import DANUBE_TEMPLATE, resolve_template
from megatron_danube.data.tokenizer import load_tokenizer
from megatron_danube.errors import DanubeConfigError
from tests.conftest import REPO

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, what's 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": " Thanks!\n"},
    {"role": "assistant", "content": "You're welcome >_<  émoji 🙂 \t tabs"},
]
SINGLE = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]
# A template with BOS and a generation prompt that differs from the assistant header.
CHATML_LIKE = (
    "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mistral-v1")


@pytest.fixture(scope="module")
def hf_tokenizers(tokenizer, tmp_path_factory):
    from transformers import AutoTokenizer

    from megatron_danube.data.hf_tokenizer import save_hf_tokenizer

    out = {}
    for name, template in (("danube", DANUBE_TEMPLATE), ("bos", CHATML_LIKE)):
        path = tmp_path_factory.mktemp(f"hf_{name}")
        save_hf_tokenizer(tokenizer, str(path), chat_template=template)
        out[name] = AutoTokenizer.from_pretrained(str(path))
    return out


def hf_ids(hf, messages, **kwargs):
    ids = hf.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("messages", [MULTI_TURN, SINGLE], ids=["multi_turn_system", "single"])
@pytest.mark.parametrize("name", ["danube", "bos"])
def test_ids_equal_hf_apply_chat_template(tokenizer, hf_tokenizers, messages, name):
    template = DANUBE_TEMPLATE if name == "danube" else CHATML_LIKE
    sample = ChatEncoder(tokenizer, template, 4096).encode(messages)
    assert list(sample.tokens) == hf_ids(hf_tokenizers[name], messages)


def test_generation_prompt_equals_hf(tokenizer, hf_tokenizers):
    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    text = encoder.render(SINGLE[:1], add_generation_prompt=True)
    assert text == "<|prompt|>Name a prime.</s><|answer|>"
    ids, _ = encoder.encode_ids(text)
    assert ids == hf_ids(hf_tokenizers["danube"], SINGLE[:1], add_generation_prompt=True)


def supervised_text(tokenizer, sample):
    """The label tokens the loss sees, decoded turn by turn."""
    ids = [int(t) for t, m in zip(sample.labels, sample.loss_mask) if m]
    return ids


def test_loss_on_assistant_content_and_closing_eos_only(tokenizer):
    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    sample = encoder.encode(MULTI_TURN)
    ids = supervised_text(tokenizer, sample)
    first, second = MULTI_TURN[2]["content"], MULTI_TURN[4]["content"]
    expected = encoder.encode_ids(f"<|answer|>{first}</s>")[0]
    # the answer's tokens as the full render has them: content + </s>, no header, no prompt
    assert tokenizer.eod in ids and ids.count(tokenizer.eod) == 2
    decoded = tokenizer.decode(ids)
    assert first in decoded and second.strip() in decoded
    for word in ("Be brief", "Thanks", "prompt", "answer", "system"):
        assert word not in decoded
    assert len(ids) < len(sample.tokens) and expected[-1] == tokenizer.eod


def test_first_answer_token_is_predicted_from_the_answer_header(tokenizer):
    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    sample = encoder.encode(SINGLE)
    header, _ = encoder.encode_ids("<|prompt|>Name a prime.</s><|answer|>")
    position = len(header) - 1  # the last token of `<|answer|>`
    assert sample.loss_mask[position] == 1
    assert sample.loss_mask[:position].sum() == 0
    assert sample.labels[position] == sample.tokens[position + 1]
    assert tokenizer.decode([int(sample.labels[position])]).strip() == "7"
    assert sample.loss_mask[-1] == 0  # the last position has no next token in this sample


def test_masks_by_position_not_by_token_value(tokenizer):
    # The user repeats the assistant's answer word for word: same tokens, not supervised.
    echo = [
        {"role": "user", "content": "7</s>"},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "7"},
    ]
    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    sample = encoder.encode(echo)
    ids = supervised_text(tokenizer, sample)
    assert len(ids) == 2 and tokenizer.decode(ids[:1]).strip() == "7" and ids[1] == tokenizer.eod
    # the user's literal "</s>" is read as the EOS token too, yet never supervised
    assert sample.tokens.tolist().count(tokenizer.eod) == 4


def test_empty_conversation_is_a_bad_sample(tokenizer):
    with pytest.raises(SampleError):
        ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096).encode([])


def test_no_bos_with_danube_and_one_bos_with_a_bos_template(tokenizer):
    danube = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096).encode(SINGLE)
    assert tokenizer.bos not in danube.tokens.tolist()
    with_bos = ChatEncoder(tokenizer, CHATML_LIKE, 4096).encode(SINGLE)
    assert (
        with_bos.tokens[0] == tokenizer.bos and with_bos.tokens.tolist().count(tokenizer.bos) == 1
    )


def test_truncation_left_keeps_the_last_answer_and_counts(tokenizer):
    long = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "done"}]
    left = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 32, "left").encode(long)
    assert len(left) == 32 and left.truncated and left.supervised > 0
    right = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 32, "right").encode(long)
    assert len(right) == 32 and right.supervised == 0


def test_records_formats_and_bad_lines(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps({"messages": SINGLE}),
        json.dumps({"prompt": "Q?", "response": "A.", "system": "S"}),
        json.dumps({"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}]}),
        json.dumps({"text": "pretraining text"}),
        "",
    ]
    path.write_text("\n".join(lines) + "\n")
    assert messages_of({"prompt": "Q?", "response": "A.", "system": "S"})[0]["role"] == "system"
    samples = encode_files([str(path)], ChatEncoder(tokenizer, DANUBE_TEMPLATE, 64), "train")
    stats = samples.stats
    assert len(samples) == 3 and stats["records"] == 7 and stats["bad_records"] == 4
    assert stats["bad_examples"][0].startswith(f"{path}:4: malformed JSON")
    assert any(":5: no assistant message" in e for e in stats["bad_examples"])


def test_bad_records_keeps_first_five():
    bad = BadRecords()
    for i in range(9):
        bad.add(f"f:{i}", "x")
    assert bad.count == 9 and len(bad.examples) == 5


def test_cache_is_keyed_by_data_and_template(tmp_path, tokenizer):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": SINGLE}) + "\n")
    cache = str(tmp_path / "cache")
    enc = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 64)
    first, path1 = load_or_build([str(data)], enc, cache, "t", build=True)
    again, path2 = load_or_build([str(data)], enc, cache, "t", build=False)
    assert path1 == path2 and np.array_equal(first.tokens, again.tokens)
    other, path3 = load_or_build(
        [str(data)], ChatEncoder(tokenizer, CHATML_LIKE, 64), cache, "t", True
    )
    assert path3 != path1
    data.write_text(json.dumps({"messages": MULTI_TURN}) + "\n")
    missing, path4 = load_or_build([str(data)], enc, cache, "t", build=False)
    assert missing is None and path4 != path1


def test_a_damaged_cache_is_rebuilt_by_its_builder_and_named_by_readers(
    tmp_path, tokenizer, caplog
):
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"messages": SINGLE}) + "\n")
    cache = str(tmp_path / "cache")
    enc = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 64)
    first, path = load_or_build([str(data)], enc, cache, "t", build=True)
    assert isinstance(first.tokens, np.memmap)  # mapped, not loaded
    first_tokens = np.array(first.tokens)  # (the mapping must not outlive the cut below)
    tokens = os.path.join(path, "tokens.bin")
    with open(tokens, "r+b") as f:
        f.truncate(os.path.getsize(tokens) // 2)
    with pytest.raises(DanubeConfigError, match="is damaged .*remove it and run again"):
        load_or_build([str(data)], enc, cache, "t", build=False)
    with caplog.at_level("WARNING"):
        rebuilt, _ = load_or_build([str(data)], enc, cache, "t", build=True)
    assert "is damaged" in caplog.text and np.array_equal(first_tokens, rebuilt.tokens)
    again, _ = load_or_build([str(data)], enc, cache, "t", build=False)
    assert np.array_equal(first_tokens, again.tokens)


def toy_samples(lengths):
    tokens, labels, masks = [], [], []
    for k, n in enumerate(lengths):
        ids = np.arange(n + 1, dtype=np.int32) + 100 * (k + 1)
        tokens.append(ids[:-1])
        labels.append(ids[1:])
        masks.append(np.ones(n, dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return ChatSamples(
        np.concatenate(tokens), np.concatenate(labels), np.concatenate(masks), offsets, {}
    )


def test_packing_restarts_positions_and_labels_per_conversation():
    samples = toy_samples([5, 3, 7, 4])
    packs = greedy_packs(samples.lengths, np.arange(4), 10)
    assert packs == [[0, 1], [2], [3]]
    batch = packed_microbatch(samples, packs[:2], 10, pad_id=0)
    assert batch["tokens"].shape == (1, 20)
    assert batch["cu_seqlens"].tolist() == [0, 5, 8, 10, 17, 20]
    assert batch["position_ids"][0, :10].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    tokens, labels, mask = batch["tokens"][0], batch["labels"][0], batch["loss_mask"][0]
    bounds = batch["cu_seqlens"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        # inside a document each label is the next token of that same document
        assert labels[a : b - 1].tolist() == tokens[a + 1 : b].tolist() or mask[a:b].sum() == 0
    assert mask[8:10].sum() == 0 and mask[17:].sum() == 0  # padding is never trained
    assert labels[4].item() == 105  # conversation 0's last label is its own next token


def test_unpacked_and_epochs_shuffle_differently():
    lengths = np.array([3] * 10)
    one = epoch_packs(lengths, 10, epochs=2, seed=1, packing="none", shuffle=True)
    assert len(one) == 20 and all(len(p) == 1 for p in one)
    assert [p[0] for p in one[:10]] != [p[0] for p in one[10:]]
    assert sorted(p[0] for p in one[:10]) == list(range(10))


@pytest.mark.parametrize("seq_length", [64, 2048, 16384])
def test_bfd_fits_every_sample_once_and_fills_at_least_as_well_as_greedy(seq_length):
    rng = np.random.default_rng(seq_length)
    lengths = np.minimum(
        rng.lognormal(np.log(seq_length / 8), 0.9, 3000).astype(int) + 1, seq_length
    )
    packs = bfd_packs(lengths, seq_length)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert max(sum(int(lengths[i]) for i in p) for p in packs) <= seq_length
    greedy = greedy_packs(lengths, rng.permutation(len(lengths)), seq_length)
    assert fill_rate(lengths, packs, seq_length) >= fill_rate(lengths, greedy, seq_length)
    # Best fit: no two packs could merge (else the later one's items would have fitted).
    loads = sorted(sum(int(lengths[i]) for i in p) for p in packs)
    assert loads[0] + loads[1] > seq_length


def test_bfd_places_each_sample_in_the_fullest_pack_it_fits():
    # 6 opens a pack (4 free), 5 opens one (5 free), 4 goes to the fuller first (4 free).
    assert bfd_packs(np.array([4, 6, 5]), 10) == [[1, 0], [2]]
    assert bfd_packs(np.array([3, 9, 7, 2, 1]), 10) == [[1, 4], [2, 0], [3]]


def test_bfd_packs_are_shuffled_per_epoch_under_the_seed():
    lengths = np.random.default_rng(0).integers(1, 9, 200)
    run = epoch_packs(lengths, 16, epochs=3, seed=5, packing="bfd", shuffle=True)
    again = epoch_packs(lengths, 16, epochs=3, seed=5, packing="bfd", shuffle=True)
    other = epoch_packs(lengths, 16, epochs=3, seed=6, packing="bfd", shuffle=True)
    per_epoch = len(run) // 3
    epochs = [run[i * per_epoch : (i + 1) * per_epoch] for i in range(3)]
    assert run == again and run != other
    assert epochs[0] != epochs[1] != epochs[2]
    for epoch in epochs:  # every sample once per epoch, rows not sorted by length
        assert sorted(i for p in epoch for i in p) == list(range(200))
    loads = [sum(int(lengths[i]) for i in p) for p in epochs[0]]
    assert loads != sorted(loads, reverse=True)
    fixed = epoch_packs(lengths, 16, epochs=1, seed=5, packing="bfd", shuffle=False)
    assert fixed == bfd_packs(lengths, 16)


def test_template_resolution(tmp_path):
    assert resolve_template("danube") == DANUBE_TEMPLATE
    f = tmp_path / "t.jinja"
    f.write_text(CHATML_LIKE)
    assert resolve_template(str(f)) == CHATML_LIKE
    with pytest.raises(DanubeConfigError, match="does not compile"):
        resolve_template("{% for x in %}")
    with pytest.raises(DanubeConfigError, match="chat.template"):
        resolve_template("chatml")
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in %}")
    with pytest.raises(DanubeConfigError, match="does not compile"):
        resolve_template(str(broken))  # a file is checked as the same text inline is


def test_a_template_that_compiles_but_cannot_render_fails_its_probe_in_one_line(tokenizer):
    from megatron_danube.data.chat.encoder import chat_backend
    from megatron_danube.data.chat.template import ChatTemplate

    special = chat_backend(tokenizer)[1]
    ChatTemplate(DANUBE_TEMPLATE, special).check()
    for text, what in [
        ("{{ messages[0]['content'] | nosuchfilter }}", "does not compile"),
        ("{% for m in messages %}{{ m.content + undefined_name.x }}{% endfor %}", "Undefined"),
        ("{{ raise_exception('no assistant turns here') }}", "no assistant turns here"),
    ]:
        with pytest.raises(DanubeConfigError, match=what) as refused:
            ChatTemplate(resolve_template(text), special).check()
        assert "\n" not in str(refused.value)


def test_a_conversation_the_template_cannot_render_is_a_skipped_record(tokenizer):
    """Rendering errors of one record (here an undefined attribute) skip that record."""
    template = "{% for m in messages %}{{ m['content'] ~ m['name'].upper() }}{% endfor %}"
    encoder = ChatEncoder(tokenizer, template, 64, "left")
    with pytest.raises(SampleError, match="chat template refused the conversation"):
        encoder.encode(SINGLE)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_encoding_in_worker_processes_writes_the_same_cache_byte_for_byte(
    tmp_path, tokenizer, kind
):
    from megatron_danube.data.chat.dataset import RECORDS_PER_TASK
    from megatron_danube.data.demo_chat import conversations, preference_pairs

    records = (conversations() if kind == "sft" else preference_pairs())[0]
    lines = [json.dumps(r) for r in records] * 3  # over RECORDS_PER_TASK: several batches
    lines[7], lines[400] = "{not json", json.dumps({"messages": []})  # both counted as bad
    assert len(lines) > 2 * RECORDS_PER_TASK
    data = tmp_path / "c.jsonl"
    data.write_text("\n".join(lines) + "\n")
    enc = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 96)
    out = {}
    for workers in (1, 3):
        out[workers] = str(tmp_path / f"w{workers}")
        samples = encode_files(
            [str(data)], enc, "train", kind=kind, workers=workers, directory=out[workers]
        )
        assert samples.stats["bad_records"] == 2 and samples.stats["records"] == len(lines)
        assert isinstance(samples.tokens, np.memmap)
    names = sorted(os.listdir(out[1]))
    assert names == sorted(os.listdir(out[3])) and "tokens.bin" in names
    for name in names:
        with (
            open(os.path.join(out[1], name), "rb") as a,
            open(os.path.join(out[3], name), "rb") as b,
        ):
            assert a.read() == b.read(), name
    in_memory = encode_files([str(data)], enc, "train", kind=kind)
    assert np.array_equal(in_memory.tokens, samples.tokens)
    assert np.array_equal(in_memory.offsets, samples.offsets)


def _random_conversations(count: int, seed: int):
    """Conversations with awkward content: template syntax, tags of the template itself,
    newlines, tabs, non-ASCII, empty turns, an unknown role now and then."""
    rng = np.random.default_rng(seed)
    pieces = ["Hi", " ", "\n", "\t", "{{ x }}", "{% if %}", "<|answer|>", "</s>", "é🙂", "a b", ""]
    roles = ["system", "user", "assistant"]
    for _ in range(count):
        turns = []
        for i in range(int(rng.integers(1, 8))):
            role = roles[int(rng.integers(0, 3))] if i or rng.random() < 0.3 else "user"
            if rng.random() < 0.02:
                role = "tool"
            content = "".join(pieces[int(k)] for k in rng.integers(0, len(pieces), 6))
            turns.append({"role": role, "content": content})
        yield turns


def test_the_native_danube_renderer_writes_what_jinja_renders(tokenizer):
    """Text and assistant spans of the one-pass renderer equal the Jinja render and its
    prefix renders; an unknown role is refused with the template's own words."""
    from megatron_danube.data.chat.template import TemplateError

    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    checked = 0
    for messages in _random_conversations(300, seed=5):
        first = len(messages) // 2
        try:
            jinja_text = encoder.template.render(messages)
        except TemplateError as exc:
            with pytest.raises(TemplateError, match=str(exc)):
                encoder.template.render_with_spans(messages, first)
            continue
        text, spans = encoder.template.render_with_spans(messages, first)
        assert text == jinja_text
        assert spans == encoder.assistant_spans(messages, text, first)
        checked += 1
    assert checked > 200


def test_native_and_jinja_rendering_encode_to_the_same_arrays(tokenizer, monkeypatch):
    from megatron_danube.data.chat.template import ChatTemplate

    conversations = [
        (m, len(m) // 3)
        for m in _random_conversations(120, seed=6)
        if all(t["role"] != "tool" for t in m)
    ]
    native = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096).encode_many(conversations)
    monkeypatch.setattr(ChatTemplate, "render_with_spans", lambda self, messages, first=0: None)
    jinja = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096).encode_many(conversations)
    for a, b in zip(native, jinja):
        if isinstance(a, SampleError):
            assert str(a) == str(b)
            continue
        for name in ("tokens", "labels", "loss_mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert sum(not isinstance(a, SampleError) for a in native) > 50


def test_bisected_masks_equal_masks_from_every_offset(tokenizer):
    """The bisection over a SentencePiece pipeline's offsets marks exactly the tokens the
    overlap rule over all offsets marks: random spans over text with byte-fallback characters,
    runs of spaces, newlines and the template's own tags."""
    from megatron_danube.data.chat.encoder import written_by_offsets, written_by_search

    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    assert encoder.ordered_offsets
    rng = np.random.default_rng(7)
    pieces = [" ", "  ", "\n", "a", "the", " word", "é", "🙂", "中文", "</s>", "<|answer|>", "\t"]
    compared = 0
    for _ in range(200):
        text = "".join(pieces[int(k)] for k in rng.integers(0, len(pieces), 40))
        encoding = encoder.backend.encode(text, add_special_tokens=False)
        count = len(encoding.ids)
        cuts = sorted(int(c) for c in rng.integers(0, len(text) + 1, 6))
        spans = [(cuts[0], cuts[1]), (cuts[2], cuts[3]), (cuts[4], cuts[5])]
        expected = written_by_offsets(encoding.offsets, count, spans)
        np.testing.assert_array_equal(written_by_search(encoding, count, spans), expected)
        compared += int(expected.any())
    assert compared > 150


class _Offsets:
    """Token offsets as an encoding answers for them, one token at a time."""

    def __init__(self, offsets):
        self.offsets = offsets

    def token_to_chars(self, token):
        return self.offsets[token]


def test_bisection_counts_empty_pieces_inside_a_span_as_written():
    from megatron_danube.data.chat.encoder import written_by_offsets, written_by_search

    rng = np.random.default_rng(8)
    for _ in range(300):
        # Starts and ends that never decrease, as a SentencePiece pipeline's: a piece may
        # start where the previous one did (a prepended "▁" shares its character).
        offsets, start, position = [], 0, 0
        for _ in range(int(rng.integers(1, 30))):
            width = int(rng.choice([0, 0, 1, 2, 3]))  # a third of the pieces empty
            if not (width and rng.random() < 0.3):  # else it shares the previous one's start
                start = position
            offsets.append((start, max(position, start + width)))
            position = offsets[-1][1]
        cuts = sorted(int(c) for c in rng.integers(0, position + 2, 4))
        spans = [(cuts[0], cuts[1]), (cuts[2], cuts[3])]
        expected = written_by_offsets(offsets, len(offsets), spans)
        got = written_by_search(_Offsets(offsets), len(offsets), spans)
        np.testing.assert_array_equal(got, expected, err_msg=f"{offsets} {spans}")


def _awkward_texts(count: int, seed: int):
    """Texts of byte-fallback characters (4- and 3-byte ones), runs of spaces, leading spaces,
    added tokens written out, a literal `▁` and what looks like a byte piece."""
    rng = np.random.default_rng(seed)
    pieces = ["a", "the", " ", "  ", "\n", "\t", "é", "中", "🙂", "𝔘", "ꙮ", "</s>", "<s>"]
    pieces += ["<unk>", "\u2581", "<0x0A>", "<|answer|>", " word"]
    for _ in range(count):
        yield "".join(pieces[int(k)] for k in rng.integers(0, len(pieces), rng.integers(1, 40)))


def test_offsets_computed_from_ids_equal_the_tokenizers(tokenizer):
    from megatron_danube.data.chat.piece_offsets import PieceOffsets

    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    assert encoder.piece_offsets is not None
    for text in _awkward_texts(3000, seed=9):
        encoding = encoder.backend.encode(text, add_special_tokens=False)
        starts, ends = encoder.piece_offsets.of(encoding.ids, len(text))
        expected = np.asarray(encoding.offsets).reshape(-1, 2)
        np.testing.assert_array_equal(starts, expected[:, 0], err_msg=repr(text))
        np.testing.assert_array_equal(ends, expected[:, 1], err_msg=repr(text))
        # offsets that do not add up to the text are never used
        assert encoder.piece_offsets.of(encoding.ids, len(text) + 1) is None
    # a pipeline it does not model (here: one with a pre-tokenizer) is left to the tokenizer
    from tokenizers import Tokenizer, pre_tokenizers

    other = Tokenizer.from_str(encoder.backend.to_str())  # a copy: the backend is shared
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert PieceOffsets.for_backend(other) is None


def test_masks_from_computed_offsets_equal_masks_from_the_tokenizers(tokenizer, monkeypatch):
    conversations = [
        (m, len(m) // 3)
        for m in _random_conversations(150, seed=10)
        if all(t["role"] != "tool" for t in m)
    ]
    for messages, _ in conversations[:40]:
        for message in messages:
            message["content"] += next(_awkward_texts(1, seed=len(message["content"])))
    computed = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    assert computed.piece_offsets is not None
    read = ChatEncoder(tokenizer, DANUBE_TEMPLATE, 4096)
    read.piece_offsets = None
    compared = 0
    for a, b in zip(computed.encode_many(conversations), read.encode_many(conversations)):
        if isinstance(a, SampleError):
            assert str(a) == str(b)
            continue
        for name in ("tokens", "labels", "loss_mask"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        compared += int(a.loss_mask.any())
    assert compared > 50


SCRIPT_WITHOUT_MAIN_GUARD = """
import json, sys
from megatron_danube.data.chat.dataset import RECORDS_PER_TASK, encode_files
from megatron_danube.data.chat.encoder import ChatEncoder
from megatron_danube.data.chat.template import DANUBE_TEMPLATE
from megatron_danube.data.demo_chat import conversations
from megatron_danube.data.tokenizer import load_tokenizer

path = sys.argv[1]
with open(path, "w") as f:
    for record in conversations()[0] * 3:
        f.write(json.dumps(record) + "\\n")
encoder = ChatEncoder(load_tokenizer("mistral-v1"), DANUBE_TEMPLATE, 96)
encode_files([path], encoder, "train", workers=2)
"""


@pytest.mark.slow  # starts a Python process and its workers
def test_workers_that_cannot_start_fail_the_run_instead_of_hanging_it(tmp_path):
    """A script without `if __name__ == "__main__"`: its spawned workers die while starting
    (they re-run the script). The encoding fails with a line saying so, and Python's own
    explanation is printed; it used to wait forever on the first worker."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(SCRIPT_WITHOUT_MAIN_GUARD)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "c.jsonl")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "a chat encoding worker process died" in proc.stderr, proc.stderr[-3000:]
    assert "__main__" in proc.stderr  # Python's own words on the missing guard
