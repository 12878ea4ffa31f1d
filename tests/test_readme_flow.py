"""The README's own commands, as a new reader runs them: a fresh copy of the repository, a
fresh virtual environment holding only what the README has told the reader to install, the
set-up command and then every command of the demo section, at tiny scale. Then the exported
model is used the way a `transformers` user would: tokenizer round trip, generation.

The commands are read from the README itself, so README and test cannot drift apart.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow
# The README trains 300 steps; here 20 (10 on each side of the stage switch).
SIZE_OVERRIDES = (
    "train.train_tokens=20480 stages.1.start_tokens=10240 logging.eval_interval=10 "
    "optim.warmup_tokens=2048"
)
# The chat demo trains SFT 20 epochs and DPO 2; here 1 each.
CHAT_OVERRIDES = {job: "chat.epochs=1 optim.warmup_tokens=0" for job in ("sft", "dpo")}


def readme_section(title: str) -> str:
    text = open(os.path.join(REPO, "README.md")).read()
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def shell_lines(section: str):
    """The commands of a section's ```bash blocks, comments and continuations resolved."""
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
            if line:
                yield line


def test_readme_sections_have_the_commands_this_test_runs():
    setup = list(shell_lines(readme_section("Set-up: two commands")))
    assert len(setup) == 2 and setup[0].startswith("pip install") and "pretrain" in setup[0]
    demo = list(shell_lines(readme_section("After the demo")))
    assert any("danube-convert" in c for c in demo) and any("danube-compare" in c for c in demo)
    chat = list(shell_lines(readme_section("Chat fine-tuning demo")))
    assert [c for c in chat if "finetune" in c][0].endswith("danube-tiny-sft-cpu.yaml")
    assert any("danube-convert" in c for c in chat)


def _copy_of_the_repository(dest):
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        src = os.path.join(REPO, name)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, name)) or dest, exist_ok=True)
            with open(src, "rb") as f, open(os.path.join(dest, name), "wb") as g:
                g.write(f.read())


def test_readme_flow_in_a_fresh_environment(tmp_path):
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    _copy_of_the_repository(clone)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv}/bin:{env['PATH']}", VIRTUAL_ENV=str(venv))

    def sh(command: str, timeout=1800):
        proc = subprocess.run(
            ["bash", "-c", command],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"$ {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
        return proc

    first = next(shell_lines(readme_section("Set-up: two commands")))
    out = sh(f"{first} {SIZE_OVERRIDES}").stdout
    assert "final validation" in out
    for command in shell_lines(readme_section("After the demo")):
        out = sh(command).stdout
        if "danube-compare" in command:
            assert "top1_agreement: 1" in out and "tokens: " in out
    for command in shell_lines(readme_section("Chat fine-tuning demo")):
        job = None
        if "megatron_danube.finetune" in command:
            job = "sft" if "-sft-" in command else "dpo"
        out = sh(f"{command} {CHAT_OVERRIDES[job]}" if job else command).stdout
        if job:
            assert "final validation" in out
    _check_chat_export(sh, " ".join(shell_lines(readme_section("Chat fine-tuning demo"))))
    export = re.search(r"--save (\S+)", " ".join(shell_lines(readme_section("After the demo"))))
    check = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({export.group(1)!r})
model = AutoModelForCausalLM.from_pretrained({export.group(1)!r})
text = "A generator function returns an iterator; the yield statement pauses it."
ids = tok(text, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print(json.dumps({{"ids": ids[0].tolist(), "decoded": tok.decode(ids[0], skip_special_tokens=True),
                  "new": out[0, ids.shape[1]:].tolist()}}))
"""
    import json

    printed = sh(f"python -c {shlex.quote(check)}").stdout.splitlines()
    result = json.loads(next(line for line in printed if line.startswith("{")))
    from megatron_danube.data.tokenizer import load_tokenizer

    sp = load_tokenizer("mistral-v1")
    text = "A generator function returns an iterator; the yield statement pauses it."
    assert result["ids"] == [sp.bos] + sp.encode(text)  # the training tokenizer's ids
    assert result["decoded"] == text
    assert len(result["new"]) == 8


def _check_chat_export(sh, commands: str) -> None:
    """The chat export answers through apply_chat_template and stops at </s> (or the cap)."""
    import json

    export = re.search(r"--save (\S+)", commands).group(1)
    check = f"""
import json
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({export!r})
model = AutoModelForCausalLM.from_pretrained({export!r})
messages = [{{"role": "user", "content": "What does the Python reference say about lists?"}}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                              return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.shape[1]:].tolist()
print(json.dumps({{"prompt": ids[0].tolist(), "new": out, "eos": tok.eos_token_id,
                  "bos": tok.bos_token_id, "text": tok.decode(ids[0])}}))
"""
    printed = sh(f"python -c {shlex.quote(check)}").stdout.splitlines()
    result = json.loads(next(line for line in printed if line.startswith("{")))
    # the generation prompt closes the prompt; the Danube template has no BOS
    assert result["text"].rstrip().endswith("<|answer|>") and result["prompt"][0] != result["bos"]
    assert result["eos"] in result["new"] or len(result["new"]) == 60
