"""Running lm-eval over an `LM` and presenting what it returns: the table lm-eval prints, the
JSON file, and the flat `eval/<task>/<metric>` records of training."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Sequence

SKIPPED_METRIC_KEYS = ("alias", "samples", " ", "name")
SAMPLE_KEYS = ("doc_id", "target", "resps", "filtered_resps")


def evaluate(
    lm,
    names: Sequence[str],
    manager,
    *,
    num_fewshot: Optional[int] = None,
    limit=None,
    bootstrap_iters: int = 100000,
    reseed: bool = True,
    log_samples: bool = False,
) -> Optional[dict]:
    """lm-eval's `simple_evaluate` over `names`; its answer on the process that reports
    (local rank 0), None elsewhere. `reseed=False` leaves the global random generators alone
    (training keeps its own)."""
    from lm_eval import simple_evaluate

    seeds = {} if reseed else dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return simple_evaluate(
        model=lm,
        tasks=list(names),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        **seeds,
    )


def table(results: dict) -> str:
    """The results (and groups) tables as lm-eval's command line prints them."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def write_json(results: dict, path: str, about: Dict[str, object]) -> None:
    """lm-eval's `results` (and its groups, versions, shots and sample counts) with `about`
    (what was evaluated), written whole or not at all."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better")
    payload = {k: results[k] for k in keep if k in results}
    payload["n-samples"] = results.get("n-samples", {})
    payload["evaluated"] = about
    if "samples" in results:  # each document's responses, without the documents themselves
        payload["samples"] = {
            task: [{k: s[k] for k in SAMPLE_KEYS if k in s} for s in samples]
            for task, samples in results["samples"].items()
        }
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def flat_metrics(results: dict) -> Dict[str, float]:
    """{"eval/<task>/<metric>": value} of every number lm-eval reports per task and group,
    standard errors left out; the filter is kept where it is not `none` (`exact_match/
    strict-match`)."""
    flat: Dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                if key in SKIPPED_METRIC_KEYS or "_stderr" in key:
                    continue
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                metric, _, filter_name = key.partition(",")
                name = metric if filter_name in ("", "none") else f"{metric}/{filter_name}"
                flat[f"eval/{task}/{name}"] = float(value)
    return flat
