"""data/hf_tokenizer.py: the exported HF tokenizer encodes and decodes like the SentencePiece model
that trained the run, under the installed transformers (5.x) and, in the slow tier, 4.x."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

from megatron_danube.data.hf_tokenizer import save_hf_tokenizer
from megatron_danube.data.tokenizer import load_tokenizer
from megatron_danube.errors import DanubeConfigError
from tests.conftest import REPO

TEXTS = [
    "",
    "Hello world",
    " Hello",  # one leading space: SentencePiece encodes "▁▁Hello"
    "   three leading spaces",
    "trailing spaces   ",
    "multiple     spaces   inside",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nline five\r\n",
    "\n starts with a newline",
    "Héllo café naïve Ångström Zürich Ærøskøbing",
    "日本語のテキストと中文文本",
    "rare CJK 𠀀𪚥𰻞 needs byte fallback",
    "emoji 😀👍🏽🇦🇹 and ✓ ☃",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] , c ; }",
    "numbers 0 12 345 6789 3.14159 -1e-9 1,000,000",
    "spaces before punctuation . , ! ? and 'quotes'",
    "\u00a0non-breaking\u3000ideographic\u200bzero-width",
    "“smart quotes” – en dash — em dash … ellipsis",
    "mixed: Ελληνικά, русский, العربية, עברית, हिन्दी",
    " ",
    "\t",
    "a literal <0x41> is text, not the byte piece",
    "\t tab and space at both ends \t",
    "  \n  spaces around a newline  \n  ",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
MAX_LEN = 8192


def mismatches(hf, sp, texts=TEXTS):
    """(text, what, hf result, sp result) for every text where HF and SentencePiece differ."""
    found = []
    for text in texts:
        ids = sp.encode(text)
        got = hf.encode(text, add_special_tokens=False)
        if got != ids:
            found.append((text, "encode", got, ids))
        if hf.decode(ids) != sp.decode(ids):
            found.append((text, "decode", hf.decode(ids), sp.decode(ids)))
    return found


def export(tmp_path_factory, spec, **kwargs):
    out = str(tmp_path_factory.mktemp("hf_tok"))
    save_hf_tokenizer(load_tokenizer(spec), out, **kwargs)
    return out


def auto(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def mistral_sp():
    return spm.SentencePieceProcessor(model_file=load_tokenizer("mistral-v1").path)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return export(
        tmp_path_factory, "mistral-v1", chat_template=CHAT_TEMPLATE, model_max_length=MAX_LEN
    )


@pytest.fixture(scope="module")
def mistral_hf(mistral_dir):
    return auto(mistral_dir)


def train_small_model(folder, model_type, normalization="nmt_nfkc"):
    """A tiny byte-fallback model with SentencePiece's whitespace clean-up, unlike mistral-v1
    (spaces kept). nmt_nfkc, the trainer's default, also turns tabs and newlines into spaces;
    identity keeps them, which shows the clean-up touches U+0020 only."""
    corpus = folder / "corpus.txt"
    lines = [
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.",
        "def main(args):\n    for i in range(10):\n        print(i * 2)",
        "Größe Straße naïve café résumé, Zürich and Wien.",
        "東京 大阪 京都 and numbers 123 456 7890.",
        "markup <b>bold</b> and hex 0x41 0xFF",  # so "<0x41>" can be spelled from pieces
    ]
    corpus.write_text("\n".join(lines * 60) + "\n", encoding="utf-8")
    prefix = folder / f"small_{model_type}_{normalization}"
    # 256 byte pieces plus the corpus characters need ~330 ids; the cap is soft.
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type=model_type,
        vocab_size=400,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        normalization_rule_name=normalization,
        remove_extra_whitespaces=True,
    )
    return f"{prefix}.model"


# ------------------------------------------------------------------------- mistral-v1 model


def test_mistral_encode_and_decode_match_sentencepiece(mistral_hf, mistral_sp):
    assert mismatches(mistral_hf, mistral_sp) == []


def test_mistral_round_trips_text(mistral_hf):
    # Identity normalisation keeps every character, so decode(encode(text)) is the text.
    for text in TEXTS:
        assert mistral_hf.decode(mistral_hf.encode(text, add_special_tokens=False)) == text


def test_byte_fallback_pieces_are_used(mistral_hf, mistral_sp):
    text = "𠀀"  # not in the 32k vocabulary: four UTF-8 byte pieces
    ids = mistral_hf.encode(text, add_special_tokens=False)
    assert mistral_hf.convert_ids_to_tokens(ids)[-4:] == ["<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]
    assert ids == mistral_sp.encode(text)


def test_special_tokens_prepend_bos_only(mistral_hf, mistral_sp):
    for text in ("Hello world", " lead", ""):
        assert mistral_hf.encode(text) == [1] + mistral_sp.encode(text)
    assert mistral_hf("a b")["input_ids"] == [1] + mistral_sp.encode("a b")
    assert mistral_hf.decode(mistral_hf.encode("Hi there"), skip_special_tokens=True) == "Hi there"


def test_literal_control_text_is_special_in_hf(mistral_hf, mistral_sp):
    # The one documented divergence, as in every HF Llama tokenizer (chat templates rely on
    # it): HF reads a literal "<s>" as BOS, SentencePiece spells it out.
    assert mistral_hf.encode("<s>", add_special_tokens=False) == [1]
    assert mistral_sp.encode("<s>") != [1]


def test_special_token_ids_and_config(mistral_hf, mistral_dir):
    tok = mistral_hf
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<unk>", 0)
    assert tok.model_max_length == MAX_LEN
    assert len(tok) == 32000
    assert os.path.isfile(os.path.join(mistral_dir, "tokenizer.model"))
    with open(os.path.join(mistral_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_chat_template_written_and_applied(mistral_hf, mistral_dir, mistral_sp):
    with open(os.path.join(mistral_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE
    rendered = mistral_hf.apply_chat_template(CHAT, tokenize=False)
    assert rendered == "<s>[INST] Hi [/INST]Hello!</s>"
    # The rendered BOS/EOS strings become the special ids, not their spelled-out pieces.
    ids = mistral_hf.encode(rendered, add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert ids[1:-1] == mistral_sp.encode("[INST] Hi [/INST]Hello!")


def test_no_chat_template_unless_given(tmp_path_factory):
    out = export(tmp_path_factory, "mistral-v1")
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert "chat_template" not in json.load(f)


# ------------------------------------------------------------- models trained on the fly


@pytest.fixture(scope="module", params=["bpe", "unigram", "bpe-identity"])
def small_model(request, tmp_path_factory):
    model_type, _, normalization = request.param.partition("-")
    folder = tmp_path_factory.mktemp(request.param)
    return train_small_model(folder, model_type, normalization or "nmt_nfkc")


def test_trained_model_matches_sentencepiece(small_model, tmp_path_factory):
    hf = auto(export(tmp_path_factory, small_model))
    sp = spm.SentencePieceProcessor(model_file=small_model)
    assert mismatches(hf, sp) == []
    assert hf.encode("quick fox") == [sp.bos_id()] + sp.encode("quick fox")
    assert (hf.bos_token_id, hf.eos_token_id) == (sp.bos_id(), sp.eos_id())


# ------------------------------------------------------------------ HF directory input


def test_hf_directory_round_trips(mistral_dir, mistral_sp, tmp_path_factory):
    tok = load_tokenizer(mistral_dir)
    assert tok.kind == "huggingface"
    out = str(tmp_path_factory.mktemp("hf_again"))
    save_hf_tokenizer(tok, out)
    hf = auto(out)
    assert mismatches(hf, mistral_sp) == []
    assert hf.encode("Hi") == [1] + mistral_sp.encode("Hi")
    assert hf.apply_chat_template(CHAT, tokenize=False) == "<s>[INST] Hi [/INST]Hello!</s>"
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        config = json.load(f)
    # transformers 5 saves "TokenizersBackend", a class transformers 4 does not have, and the
    # template to chat_template.jinja, which 4.45 does not read.
    assert config["tokenizer_class"] != "TokenizersBackend"
    assert config["chat_template"] == CHAT_TEMPLATE
    assert not os.path.exists(os.path.join(out, "chat_template.jinja"))


def test_hf_directory_chat_template_override(mistral_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf_override"))
    save_hf_tokenizer(load_tokenizer(mistral_dir), out, chat_template="{{ eos_token }}")
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == "{{ eos_token }}"
    assert auto(out).apply_chat_template(CHAT, tokenize=False) == "</s>"


def test_missing_tokenizers_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import now raises ImportError
    with pytest.raises(DanubeConfigError) as err:
        save_hf_tokenizer(load_tokenizer("mistral-v1"), str(tmp_path))
    message = str(err.value)
    assert 'pip install -e ".[hf]"' in message and "tokenizers" in message
    assert "\n" not in message


# ------------------------------------------------------------------ transformers 4.x (slow)

# Bump the suffix to force a rebuild; the venv is kept under the git-ignored .cache/.
VENV_KEY = f"py{sys.version_info.major}{sys.version_info.minor}-v1"
V4_SPECS = {
    "4.45": "transformers==4.45.*",  # the floor setup/pyproject promise
    "4.x": "transformers>=4.45,<5",  # the newest 4.x release
}
NETWORK_ERRORS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "ConnectTimeout",
    "Max retries exceeded",
    "Connection refused",
    "(from versions: none)",  # no index answered: a reachable PyPI always lists transformers
)
V4_SCRIPT = r"""
import json, sys
import transformers
from transformers import AutoTokenizer

inputs = json.load(open(sys.argv[1], encoding="utf-8"))
texts, chat = inputs["texts"], inputs["chat"]
report = {"version": transformers.__version__}
for folder in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(folder)
    plain = [tok.encode(t, add_special_tokens=False) for t in texts]
    report[folder] = {
        "class": type(tok).__name__,
        "plain": plain,
        "special": [tok.encode(t) for t in texts],
        "decoded": [tok.decode(ids) for ids in plain],
        "bos_eos": [tok.bos_token_id, tok.eos_token_id],
        "chat": tok.apply_chat_template(chat, tokenize=False) if tok.chat_template else None,
    }
print(json.dumps(report))
"""


def v4_python(label: str) -> str:
    """The python of a cached venv holding transformers `label` (built on first use)."""
    root = os.path.join(REPO, ".cache", "hf-tokenizer-venvs", f"transformers-{label}-{VENV_KEY}")
    python = os.path.join(root, "bin", "python")
    if os.path.isfile(os.path.join(root, ".ready")):
        return python
    # Build beside the final path and rename, so an interrupted or concurrent build never
    # leaves a half-installed venv that a later run would trust.
    building = f"{root}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", building], check=True, timeout=300)
    pip = subprocess.run(
        [
            os.path.join(building, "bin", "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            V4_SPECS[label],
            "tokenizers",
            "sentencepiece",
            "protobuf",
            "jinja2",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if pip.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        if any(marker in pip.stderr for marker in NETWORK_ERRORS):
            pytest.skip(f"pip cannot reach the package index: {pip.stderr.strip()[-300:]}")
        pytest.fail(f"pip install {V4_SPECS[label]} failed:\n{pip.stderr[-3000:]}")
    open(os.path.join(building, ".ready"), "w").close()
    try:
        os.rename(building, root)
    except OSError:  # another run finished first: use its venv
        shutil.rmtree(building, ignore_errors=True)
    return python


def run_in_v4(label, tmp_path, folders):
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"texts": TEXTS, "chat": CHAT}), encoding="utf-8")
    script = tmp_path / "load_v4.py"
    script.write_text(V4_SCRIPT, encoding="utf-8")
    result = subprocess.run(
        [v4_python(label), str(script), str(inputs), *folders],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(V4_SPECS))
def test_transformers4_loads_the_export(label, mistral_dir, tmp_path, tmp_path_factory):
    small = train_small_model(tmp_path, "bpe")
    small_dir = export(tmp_path_factory, small)
    round_trip = str(tmp_path_factory.mktemp("hf_again_v4"))
    save_hf_tokenizer(load_tokenizer(mistral_dir), round_trip)  # template carried over
    report = run_in_v4(label, tmp_path, [mistral_dir, small_dir, round_trip])
    assert report["version"].startswith("4."), report["version"]
    if label == "4.45":
        assert report["version"].startswith("4.45.")
    for folder, model in ((mistral_dir, None), (small_dir, small), (round_trip, None)):
        sp = spm.SentencePieceProcessor(model_file=model or load_tokenizer("mistral-v1").path)
        got = report[folder]
        expected = [sp.encode(t) for t in TEXTS]
        assert got["plain"] == expected, (report["version"], folder)
        assert got["special"] == [[sp.bos_id()] + ids for ids in expected]
        assert got["decoded"] == [sp.decode(ids) for ids in expected]
        assert got["bos_eos"] == [sp.bos_id(), sp.eos_id()]
    assert report[mistral_dir]["chat"] == "<s>[INST] Hi [/INST]Hello!</s>"
    assert report[round_trip]["chat"] == "<s>[INST] Hi [/INST]Hello!</s>"
