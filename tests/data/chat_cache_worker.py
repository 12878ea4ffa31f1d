"""Two ranks share chat samples through `shared_samples` (gloo, CPU).

argv: DATA.jsonl CACHE_DIR MODE OUT_PREFIX. MODE `shared`: both ranks see one cache directory
(one node, or a shared file system); `per-node`: rank 1 plays the first rank of a second node
whose cache directory rank 0 cannot write to. Each rank writes OUT_PREFIX.RANK.json.
"""

import json
import os
import resource
import sys

import numpy as np
import torch.distributed as dist

from megatron_danube.data.chat.dataset import shared_samples
from megatron_danube.data.chat.encoder import ChatEncoder
from megatron_danube.data.chat.template import DANUBE_TEMPLATE
from megatron_danube.data.tokenizer import load_tokenizer


def main(data, cache_dir, mode, out_prefix):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "per-node":
        cache_dir = os.path.join(cache_dir, f"node{rank}")
    encoder = ChatEncoder(load_tokenizer("mistral-v1"), DANUBE_TEMPLATE, 96)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = shared_samples(
        {"train": [data]},
        encoder,
        cache_dir,
        kind="sft",
        workers=2,
        is_main=rank == 0,
        node_main=rank == 0 or mode == "per-node",
        barrier=dist.barrier,
    )
    samples = loaded["train"]
    total = int(sum(int(samples.sample(i)[0].sum()) for i in range(len(samples))))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = {
        "mapped": isinstance(samples.tokens, np.memmap),
        "file": os.path.realpath(samples.tokens.filename),
        "samples": len(samples),
        "token_sum": total,
        "rss_growth_kb": after - before,
    }
    with open(f"{out_prefix}.{rank}.json", "w") as f:
        json.dump(record, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
