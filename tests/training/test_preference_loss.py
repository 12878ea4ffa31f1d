"""DPO-family losses against their formulas, and the preference data formats."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_danube.data.chat.encoder import SampleError
from megatron_danube.data.chat.preference import pair_of
from megatron_danube.training.preference_loss import dpo_metrics, pair_report, preference_losses

BETA = 0.2


def vectors():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    return pc, pr, rc, rr


def test_policy_equal_to_reference_gives_exactly_ln2():
    pc, pr, _, _ = vectors()
    losses = preference_losses(pc, pr, pc.clone(), pr.clone(), beta=BETA)
    assert torch.all(losses == math.log(2))


def test_sigmoid_is_minus_logsigmoid_of_beta_margin():
    pc, pr, rc, rr = vectors()
    margin = (pc - rc) - (pr - rr)
    expected = -F.logsigmoid(BETA * margin)
    assert torch.allclose(preference_losses(pc, pr, rc, rr, beta=BETA), expected, rtol=0, atol=0)


def test_label_smoothing_mixes_the_flipped_label():
    pc, pr, rc, rr = vectors()
    margin, eps = (pc - rc) - (pr - rr), 0.1
    expected = -(1 - eps) * F.logsigmoid(BETA * margin) - eps * F.logsigmoid(-BETA * margin)
    got = preference_losses(pc, pr, rc, rr, beta=BETA, label_smoothing=eps)
    assert torch.allclose(got, expected)


def test_hinge_and_ipo_formulas():
    pc, pr, rc, rr = vectors()
    margin = (pc - rc) - (pr - rr)
    hinge = preference_losses(pc, pr, rc, rr, beta=BETA, loss_type="hinge")
    assert torch.allclose(hinge, torch.relu(1 - BETA * margin))
    tc, tr = (
        torch.arange(1.0, 17.0, dtype=torch.float64),
        torch.full((16,), 5.0, dtype=torch.float64),
    )
    ipo = preference_losses(
        pc, pr, rc, rr, beta=BETA, loss_type="ipo", chosen_tokens=tc, rejected_tokens=tr
    )
    expected = ((pc - rc) / tc - (pr - rr) / tr - 1 / (2 * BETA)) ** 2
    assert torch.allclose(ipo, expected)
    with pytest.raises(ValueError, match="loss_type"):
        preference_losses(pc, pr, rc, rr, beta=BETA, loss_type="kto")


def test_metrics_follow_trl_definitions():
    pc = torch.tensor([-10.0, -20.0])
    pr = torch.tensor([-12.0, -18.0])
    rc = torch.tensor([-11.0, -20.0])
    rr = torch.tensor([-11.0, -19.0])
    losses = preference_losses(pc, pr, rc, rr, beta=BETA)
    metrics = dpo_metrics(pair_report(losses, pc, pr, rc, rr, BETA))
    assert metrics["rewards/chosen"] == pytest.approx(BETA * (1.0 + 0.0) / 2)
    assert metrics["rewards/rejected"] == pytest.approx(BETA * (-1.0 + 1.0) / 2)
    assert metrics["rewards/accuracies"] == 0.5  # pair 2: 0 > 0.2 is false
    assert metrics["rewards/margins"] == pytest.approx(BETA * ((1 + 1) + (0 - 1)) / 2)
    assert metrics["logps/chosen"] == -15.0 and metrics["logps/rejected"] == -15.0
    assert metrics["loss"] == pytest.approx(losses.mean().item())


def test_pair_formats():
    prompt, chosen, rejected = pair_of({"prompt": "Q?", "chosen": "good", "rejected": "bad"})
    assert prompt == [{"role": "user", "content": "Q?"}]
    assert chosen == [{"role": "assistant", "content": "good"}] and rejected[0]["content"] == "bad"
    multi = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    prompt, chosen, _ = pair_of(
        {"prompt": multi, "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"}
    )
    assert prompt == multi and chosen[0]["content"] == "A"
    ranked = {"prompt": "Q", "responses": ["mid", "best", "worst"], "ranks": [1, 0, 2]}
    _, chosen, rejected = pair_of(ranked)
    assert chosen[0]["content"] == "best" and rejected[0]["content"] == "worst"
    _, chosen, rejected = pair_of({"prompt": "Q", "responses": ["first", "second"]})
    assert chosen[0]["content"] == "first" and rejected[0]["content"] == "second"


@pytest.mark.parametrize(
    "record,reason",
    [
        ({"prompt": "Q", "chosen": "A"}, "no `chosen`/`rejected`"),
        ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "the same"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 1]}, "same rank"),
        ({"prompt": 3, "chosen": "A", "rejected": "B"}, "`prompt` must be"),
        ({"prompt": "Q", "chosen": "A", "rejected": [{"role": "x", "content": "B"}]}, "role"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranks": [0, "x"]}, "finite numbers"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranks": [0, float("nan")]}, "finite"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranks": [0, [1]]}, "finite numbers"),
        ({"prompt": "Q", "responses": ["a", "b"], "ranks": [True, False]}, "finite numbers"),
        ({"prompt": "Q", "system": 5, "chosen": "A", "rejected": "B"}, "`system` must be"),
    ],
)
def test_bad_pairs_name_the_problem(record, reason):
    with pytest.raises(SampleError, match=reason):
        pair_of(json.loads(json.dumps(record)))


def test_a_malformed_ranked_record_is_skipped_and_counted(tmp_path):
    """One bad line among good ones: skipped with `file:line: reason`, the rest is read."""
    from megatron_danube.data.chat.dataset import encode_files
    from megatron_danube.data.chat.encoder import ChatEncoder
    from megatron_danube.data.chat.template import DANUBE_TEMPLATE
    from megatron_danube.data.tokenizer import load_tokenizer

    good = {"prompt": "Q", "responses": ["best", "worst"], "ranks": [0, 1]}
    bad = dict(good, ranks=[0, "x"])
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad, good)))
    encoder = ChatEncoder(load_tokenizer("mistral-v1"), DANUBE_TEMPLATE, 64, "left")
    samples = encode_files([str(path)], encoder, "chat.train", kind="dpo")
    assert len(samples) == 4 and samples.stats["bad_records"] == 1
    assert any(f"{path}:2" in example for example in samples.stats["bad_examples"])


def test_dpo_loss_of_a_packed_row_with_sft_term():
    """Document sums over a packed row (two pairs, then padding) and the added SFT term."""
    from megatron_danube.config import DpoSection
    from megatron_danube.training.jobs.dpo import _dpo_loss

    cu_seqlens = torch.tensor([0, 4, 7, 11, 13, 16], dtype=torch.int32)
    mask = torch.tensor([0, 1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.float32)
    per_token = torch.arange(1.0, 17.0) / 10  # -log p of each position's label
    batch = {
        "cu_seqlens": cu_seqlens,
        "loss_mask": mask.view(1, -1),
        "doc_kind": torch.tensor([1, 2, 1, 2, 0]),
        "ref_logps": torch.tensor([-0.5, -1.0, -2.0, -0.1, 0.0]),
    }
    logps, tokens = [], []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        logps.append(-(per_token[a:b] * mask[a:b]).sum())
        tokens.append(mask[a:b].sum())
    pc, pr = torch.stack([logps[0], logps[2]]), torch.stack([logps[1], logps[3]])
    rc, rr = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -0.1])
    settings = DpoSection(beta=0.3, sft_weight=0.5)
    expected = preference_losses(pc, pr, rc, rr, beta=0.3)
    expected = expected + 0.5 * (-pc / torch.stack([tokens[0], tokens[2]]))
    loss, pairs, reports = _dpo_loss(batch, per_token.view(1, -1), settings)
    assert pairs.item() == 2
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-6)
    assert reports["dpo"][0].item() == pytest.approx(expected.sum().item(), rel=1e-6)
    metrics = dpo_metrics(reports["dpo"])
    assert metrics["logps/chosen"] == pytest.approx(pc.mean().item(), rel=1e-6)
