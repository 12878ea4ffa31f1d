"""A missing optional dependency is one line naming the extra to install, never a traceback.

Each tool runs in a fresh interpreter where the optional modules cannot be imported (their
`sys.modules` entries are None, which is what Python reports for a module that is not there).
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def run_without(modules, code):
    return subprocess.run(
        [sys.executable, "-c", BLOCK.format(mods=list(modules)) + code],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "tool,argv,missing,extra",
    [
        (
            "megatron_danube.cli.convert",
            ["--to", "hf", "--load", "{ckpt}", "--save", "{out}"],
            ["safetensors", "safetensors.torch"],
            "hf",
        ),
        (
            "megatron_danube.cli.compare",
            ["--hf", "{ckpt}", "--mcore", "{ckpt}"],
            ["transformers"],
            "hf",
        ),
        (
            "megatron_danube.cli.preprocess",
            [
                "--input",
                "{jsonl_zst}",
                "--output-prefix",
                "{out}/x",
                "--tokenizer-model",
                "mistral-v1",
            ],
            ["zstandard"],
            "data",
        ),
        (
            "megatron_danube.cli.preprocess",
            ["--input", "{jsonl}", "--output-prefix", "{out}/x", "--tokenizer-model", "mistral-v1"],
            ["mistral_common"],
            "demo",
        ),
    ],
)
def test_missing_extra_is_named(tmp_path, tool, argv, missing, extra):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "hello world"}\n')
    (tmp_path / "in.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")  # any .zst: never opened
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    values = dict(
        ckpt=tmp_path / "ckpt",
        out=tmp_path / "out",
        jsonl=jsonl,
        jsonl_zst=tmp_path / "in.jsonl.zst",
    )
    (tmp_path / "out").mkdir()
    args = [a.format(**values) for a in argv]
    code = f"import sys\nfrom {tool} import main\nsys.exit(main({args!r}))\n"
    proc = run_without(missing, code)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f'pip install -e ".[{extra}]"' in lines[0], proc.stderr
