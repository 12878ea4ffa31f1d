"""Chat data preparation: this package's encoding and packing against TRL's, on one synthetic set.

Builds N conversations shaped like the Danube chat recipe's data (lognormal lengths of mean
about 720 tokens, 1 to 6 turns, a third with a system prompt), their text runs of real words
from Python's bundled pydoc topics, generated deterministically from --seed. Then, in one run:

  encode   `encode_files` (read, render the Danube template, tokenize, mask, write the cache
           folder a training run writes): conversations/s, tokens/s, peak resident memory;
           the packing fill at 2,048, 4,096 and 16,384 tokens for best-fit decreasing and
           greedy packing (the packs a training run would make);
  cache    the resident memory a process gains by loading the written cache
           (`ChatSamples.load`) and reading one sample, measured in a fresh process;
  TRL      what TRL's SFTTrainer does to the same file before training (`Dataset.from_json`,
           then its own `_prepare_dataset`: chat template, tokenization, assistant masks,
           labels, BFD packing to 2,048) with `dataset_num_proc` = --workers.

Tokens/s of both count the same tokens (the set's, encoded whole), so their ratio is the ratio
of the times. Figures are printed as measured; `--json` writes them all.

    danube-benchmark-chat-data --conversations 157000 --json chat-data.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Dict, List

import numpy as np

from megatron_danube.cli.common import report, run_command, summary

logger = logging.getLogger("danube-benchmark-chat-data")

PACK_LENGTHS = (2048, 4096, 16384)
TRL_PACK_LENGTH = 2048
MEAN_TOKENS = 720  # the recipe's conversations average 600 to 840 tokens
LENGTH_SIGMA = 0.9  # lognormal spread: most conversations short, a long tail
MAX_TURNS = 6
SYSTEM_SHARE = 3  # every third conversation has a system prompt
# The Danube template with the assistant's part marked for `return_assistant_tokens_mask`,
# which TRL's assistant-only loss needs; it renders the same text as the plain one.
DANUBE_TEMPLATE_WITH_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '<|prompt|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|answer|>' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|answer|>' }}{% endif %}"
)
# Run in a fresh interpreter: the resident memory that loading the cache and reading one
# sample adds, after the imports it needs.
CACHE_PROBE = """
import sys
import psutil
from megatron_danube.data.chat.samples import ChatSamples

process = psutil.Process()
before = process.memory_info().rss
samples = ChatSamples.load(sys.argv[1])
tokens, labels, loss_mask = samples.sample(0)
checksum = int(tokens.sum()) + int(labels.sum()) + int(loss_mask.sum())
print(process.memory_info().rss - before, checksum)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conversations", type=int, default=157_000)
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="processes for encoding (where encode_files takes them) and for TRL's map "
        "(default: the cores this process may use)",
    )
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--tokenizer", default="mistral-v1")
    p.add_argument("--seed", type=int, default=0)


def corpus_words() -> List[str]:
    from megatron_danube.data.demo_corpus import pydoc_paragraphs

    return " ".join(pydoc_paragraphs()).split()


def tokens_per_word(tokenizer, words: List[str]) -> float:
    sample = words[:20_000]
    return len(tokenizer.encode(" ".join(sample))) / len(sample)


def write_conversations(path: str, count: int, words: List[str], per_word: float, seed: int):
    """`count` conversations in the `messages` format, each text a run of consecutive corpus
    words; lengths lognormal around MEAN_TOKENS."""
    rng = np.random.default_rng(seed)
    mu = np.log(MEAN_TOKENS) - LENGTH_SIGMA**2 / 2  # so that the mean is MEAN_TOKENS
    targets = rng.lognormal(mu, LENGTH_SIGMA, size=count)

    def text(n: int) -> str:
        start = int(rng.integers(0, len(words) - n))
        return " ".join(words[start : start + n])

    with open(path, "w", encoding="utf-8") as f:
        for i, target in enumerate(targets):
            turns = int(rng.integers(1, MAX_TURNS + 1))
            # a third of each exchange is the question, two thirds the answer, jittered
            shares = rng.dirichlet(np.tile([1.0, 2.0], turns))
            sizes = np.maximum(3, np.round(shares * target / per_word)).astype(int)
            messages = [{"role": "system", "content": text(20)}] if i % SYSTEM_SHARE == 0 else []
            for turn in range(turns):
                messages.append({"role": "user", "content": text(sizes[2 * turn])})
                messages.append({"role": "assistant", "content": text(sizes[2 * turn + 1])})
            f.write(json.dumps({"messages": messages}) + "\n")


def encode(path: str, encoder, workers: int, cache: str):
    """(samples, seconds, processes used) of this package's encoding, written to the cache
    folder `cache` as a training run writes it (where this encode_files can)."""
    from megatron_danube.data.chat.dataset import encode_files

    takes = inspect.signature(encode_files).parameters
    options = {"workers": workers} if "workers" in takes else {}
    if "directory" in takes:
        options["directory"] = cache
    started = time.perf_counter()
    samples = encode_files([path], encoder, "chat.train", **options)
    return samples, time.perf_counter() - started, workers if "workers" in takes else 1


def packing_fills(lengths: np.ndarray, seed: int) -> Dict[str, Dict[str, float]]:
    """Fill of the rows a training run would make at each length (samples longer than a row
    are cut to it, as `chat.seq_length` cuts them)."""
    from megatron_danube.data.chat.packing import epoch_packs, fill_rate

    fills: Dict[str, Dict[str, float]] = {"bfd": {}, "greedy": {}}
    for length in PACK_LENGTHS:
        cut = np.minimum(lengths, length)
        for packing in fills:
            packs = epoch_packs(cut, length, epochs=1, seed=seed, packing=packing, shuffle=True)
            fills[packing][str(length)] = fill_rate(cut, packs, length)
    return fills


def cache_resident_bytes(samples, path: str) -> int:
    """Resident memory a fresh process gains loading the cache at `path` (written there by
    the encoding, or now) and reading one sample."""
    if not os.path.exists(path):
        samples.save(path)
    out = subprocess.run(
        [sys.executable, "-c", CACHE_PROBE, path],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(out.stdout.split()[0])


def trl_prepare(path: str, tokenizer, workers: int, folder: str) -> dict:
    """TRL's own preparation of the same file, as SFTTrainer runs it (its `_prepare_dataset`
    on the trainer's settings), timed."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    from megatron_danube.data.hf_tokenizer import save_hf_tokenizer

    tokenizer_dir = os.path.join(folder, "hf-tokenizer")
    save_hf_tokenizer(tokenizer, tokenizer_dir, chat_template=DANUBE_TEMPLATE_WITH_GENERATION)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = SFTConfig(
        output_dir=os.path.join(folder, "trl"),
        max_length=TRL_PACK_LENGTH,
        packing=True,
        packing_strategy="bfd",
        assistant_only_loss=True,
        dataset_num_proc=workers,
        report_to=[],
        bf16=False,  # training precision: no part of data preparation; TRL's default needs a GPU
    )
    # What `_prepare_dataset` reads of the trainer, set as SFTTrainer.__init__ sets them for
    # a tokenizer with its own chat template and a conversational dataset.
    trainer = SimpleNamespace(_tokenizer=hf, chat_template=None, completion_only_loss=None)
    started = time.perf_counter()
    dataset = datasets.Dataset.from_json(path, cache_dir=os.path.join(folder, "hf-cache"))
    loaded = time.perf_counter()
    packed = SFTTrainer._prepare_dataset(trainer, dataset, hf, config, True, None, "train")
    done = time.perf_counter()
    rows_tokens = sum(sum(s) for s in packed["seq_lengths"])
    return {
        "load_seconds": loaded - started,
        "prepare_seconds": done - loaded,
        "seconds": done - started,
        "fill": rows_tokens / (len(packed) * TRL_PACK_LENGTH),
    }


def hardware() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": psutil.virtual_memory().total,
    }


def measure(args: argparse.Namespace, folder: str) -> dict:
    from megatron_danube.data.chat.encoder import ChatEncoder
    from megatron_danube.data.chat.packing import bfd_packs
    from megatron_danube.data.chat.template import DANUBE_TEMPLATE
    from megatron_danube.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    words = corpus_words()
    path = os.path.join(folder, "conversations.jsonl")
    write_conversations(
        path, args.conversations, words, tokens_per_word(tokenizer, words), args.seed
    )
    logger.info("wrote %s conversations (%.0f MB)", f"{args.conversations:,}", _mb(path))

    encoder = ChatEncoder(tokenizer, DANUBE_TEMPLATE, max(PACK_LENGTHS))
    cache = os.path.join(folder, "sft-benchmark-cache")
    samples, encode_s, processes = encode(path, encoder, args.workers, cache)
    lengths = samples.lengths
    started = time.perf_counter()
    bfd_packs(np.minimum(lengths, TRL_PACK_LENGTH), TRL_PACK_LENGTH)
    pack_s = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    tokens = int(lengths.sum())
    logger.info(
        "encoded %s samples, %s tokens in %.1f s", f"{len(samples):,}", f"{tokens:,}", encode_s
    )
    fills = packing_fills(lengths, args.seed)
    cache_rss = cache_resident_bytes(samples, cache)
    del samples
    trl = trl_prepare(path, tokenizer, args.workers, folder)
    ours_s = encode_s + pack_s
    return {
        "date": time.strftime("%Y-%m-%d"),
        "conversations": args.conversations,
        "samples": len(lengths),
        "tokens": tokens,
        "mean_tokens": tokens / max(len(lengths), 1),
        "workers": args.workers,
        "encode_processes": processes,
        "encode_seconds": encode_s,
        "pack_seconds": pack_s,
        "encode_conversations_per_s": len(lengths) / encode_s,
        "encode_tokens_per_s": tokens / encode_s,
        "peak_rss_bytes": peak,
        "peak_rss_children_bytes": children_peak,
        "cache_rss_bytes": cache_rss,
        "fill": fills["bfd"],
        "greedy_fill": fills["greedy"],
        "trl_load_seconds": trl["load_seconds"],
        "trl_prepare_seconds": trl["prepare_seconds"],
        "trl_encode_conversations_per_s": len(lengths) / trl["seconds"],
        "trl_encode_tokens_per_s": tokens / trl["seconds"],
        "trl_fill_2048": trl["fill"],
        "vs_trl": trl["seconds"] / ours_s,
        "hardware": hardware(),
    }


def _mb(path: str) -> float:
    return os.path.getsize(path) / 1e6


def print_figures(r: dict) -> None:
    hw = r["hardware"]
    report(
        f"{r['conversations']:,} conversations, {r['tokens']:,} tokens (mean "
        f"{r['mean_tokens']:.0f}); {hw['cpu']}, {hw['usable_cores']} of {hw['cores']} cores, "
        f"{hw['memory_bytes'] / 2**30:.0f} GiB; --workers {r['workers']}"
    )
    if r["encode_processes"] == 1 and r["workers"] > 1:
        report("encoding ran in one process: this encode_files takes no workers")
    report(
        "\n| what | seconds | conversations/s | tokens/s | ratio |\n| --- | --- | --- | --- | --- |"
    )
    ours = r["encode_seconds"] + r["pack_seconds"]
    trl = r["trl_load_seconds"] + r["trl_prepare_seconds"]
    report(
        f"| megatron_danube encode_files ({r['encode_processes']} process(es)) + BFD packs at "
        f"{TRL_PACK_LENGTH} ({r['pack_seconds']:.1f} s) | {ours:.1f} | "
        f"{r['conversations'] / ours:,.0f} | {r['tokens'] / ours:,.0f} | {r['vs_trl']:.2f}x |"
    )
    report(
        f"| TRL {_trl_version()} SFTTrainer preparation, num_proc {r['workers']} (from_json "
        f"{r['trl_load_seconds']:.1f} s) | {trl:.1f} | "
        f"{r['trl_encode_conversations_per_s']:,.0f} | "
        f"{r['trl_encode_tokens_per_s']:,.0f} | 1.00x |"
    )
    report(
        f"\nencode_files alone: {r['encode_conversations_per_s']:,.0f} conversations/s, "
        f"{r['encode_tokens_per_s']:,.0f} tokens/s; peak resident memory "
        f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB; loading the cache and reading one sample: "
        f"+{r['cache_rss_bytes'] / 2**20:,.1f} MiB resident"
    )
    report("\n| packing | " + " | ".join(str(n) for n in PACK_LENGTHS) + " |")
    report("| --- |" + " --- |" * len(PACK_LENGTHS))
    for name, key in (("bfd", "fill"), ("greedy", "greedy_fill")):
        report(f"| {name} | " + " | ".join(f"{r[key][str(n)]:.4f}" for n in PACK_LENGTHS) + " |")
    report(f"| TRL bfd | {r['trl_fill_2048']:.4f} | | |")


def _trl_version() -> str:
    import trl

    return trl.__version__


def body(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="danube-chat-bench-") as folder:
        figures = measure(args, folder)
    print_figures(figures)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(figures, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


def main(argv=None) -> int:
    return run_command("danube-benchmark-chat-data", summary(__doc__), add_arguments, body, argv)


if __name__ == "__main__":
    from megatron_danube.commands import run_as_process

    run_as_process(main)
