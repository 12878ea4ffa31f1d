"""LoRA on the megatron model against HF PEFT on the same weights (fp32, one gloo rank)."""

import pytest
import torch

from megatron_danube.errors import DanubeConfigError
from megatron_danube.models.lora import (
    LoraSettings,
    adapters_disabled,
    apply_lora,
    hf_peft_name,
    lora_parameter_count,
    mcore_lora_name,
    resolve_targets,
)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 16


def test_targets_take_megatron_and_hf_names_and_refuse_unknown_ones():
    assert resolve_targets(["linear_qkv"]) == {"linear_qkv": ("q_proj", "k_proj", "v_proj")}
    assert resolve_targets(["q_proj", "v_proj", "down_proj"]) == {
        "linear_qkv": ("q_proj", "v_proj"),
        "linear_fc2": ("down_proj",),
    }
    assert resolve_targets(["linear_fc1"], ["up_proj"]) == {"linear_fc1": ("gate_proj",)}
    with pytest.raises(DanubeConfigError, match="'qproj' names no layer; choose from linear_qkv"):
        resolve_targets(["qproj"])
    with pytest.raises(DanubeConfigError, match="selects nothing"):
        resolve_targets(["linear_proj"], ["o_proj"])


def test_names_map_to_peft_and_back():
    name = "decoder.layers.3.mlp.lora_linear_fc1.up_proj.lora_B"
    assert hf_peft_name(name) == "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
    assert mcore_lora_name(hf_peft_name(name)) == name


def _lora_build(model_cfg, settings, device="cpu"):
    """The model chunks of one rank with LoRA applied through the build's pre-wrap hook."""
    from megatron_danube.config import ParallelLayout
    from megatron_danube.training.model_build import build_model

    _, chunks = build_model(
        model_cfg,
        layout=ParallelLayout(),
        spec="local",
        device=torch.device(device),
        pre_wrap=[lambda c: apply_lora(c, model_cfg, settings)] if settings else [],
    )
    return chunks


def _models(targets, seed=0):
    """(megatron model with LoRA, HF PEFT model) with the same base and adapter weights; the
    adapters' B random, so they change the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from megatron_danube.models.full_weights import full_named_parameters, load_full_weights
    from megatron_danube.models.hf_adapter import hf_to_mcore, mistral_config
    from megatron_danube.models.presets import get_preset

    model_cfg = get_preset("danube-test")
    torch.manual_seed(seed)
    hf = MistralForCausalLM(mistral_config(model_cfg, "eager"))
    base = hf_to_mcore(hf.state_dict(), model_cfg)
    peft_model = get_peft_model(
        hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    settings = LoraSettings(RANK, ALPHA, 0.0, resolve_targets(targets))
    ours = _lora_build(model_cfg, settings)[0]
    full = full_named_parameters(ours)
    full.update({k: v for k, v in base.items() if k in full})
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            full[mcore_lora_name(name)] = p.detach().clone()
    load_full_weights([ours], full)
    return model_cfg, ours, peft_model


def _loss(model_cfg, ours, peft_model, ids):
    """Mean next-token loss of both (our logits without the vocabulary padding)."""
    inputs, labels = ids[:, :-1], ids[:, 1:].reshape(-1)
    pos = torch.arange(inputs.shape[1]).expand(inputs.shape[0], -1)
    logits = ours(inputs, pos, None)[..., : model_cfg.vocab_size]
    theirs = peft_model(input_ids=inputs).logits
    ce = torch.nn.functional.cross_entropy
    return ce(logits.reshape(labels.numel(), -1), labels), ce(
        theirs.reshape(labels.numel(), -1), labels
    )


@pytest.mark.parametrize("targets", [ALL, ["q_proj", "v_proj"], ["gate_proj", "down_proj"]])
def test_loss_and_adapter_gradients_equal_hf_peft(single_rank, targets):
    model_cfg, ours, peft_model = _models(targets)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 33), generator=torch.Generator())
    loss, ref = _loss(model_cfg, ours, peft_model, ids)
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
    loss.backward()
    ref.backward()
    theirs = {
        mcore_lora_name(n): p.grad for n, p in peft_model.named_parameters() if p.grad is not None
    }
    mine = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs) and len(mine) == 2 * len(targets) * model_cfg.num_layers
    for name, grad in mine.items():
        scale = theirs[name].abs().max()
        assert (grad - theirs[name]).abs().max() <= 1e-5 * scale + 1e-9, name


def test_the_base_is_frozen_and_b_starts_at_zero(single_rank):
    from megatron_danube.models.presets import get_preset

    model_cfg = get_preset("danube-test")
    settings = LoraSettings(RANK, ALPHA, 0.0, resolve_targets(ALL))
    torch.manual_seed(0)
    plain = _lora_build(model_cfg, None)
    torch.manual_seed(0)
    adapted = _lora_build(model_cfg, settings)
    trainable = [n for n, p in adapted[0].named_parameters() if p.requires_grad]
    assert trainable and all(".lora_linear_" in n for n in trainable)
    h, ffn, d = model_cfg.hidden_size, model_cfg.ffn_hidden_size, model_cfg.head_dim
    q, kv = model_cfg.num_attention_heads * d, model_cfg.num_query_groups * d
    # A is [r, in] and B [out, r]: q, k, v, gate, up read h; o reads q's width, down ffn's
    per_layer = RANK * (7 * h + 2 * q + 2 * kv + 3 * ffn)
    assert lora_parameter_count(adapted) == per_layer * model_cfg.num_layers
    ids = torch.randint(0, model_cfg.vocab_size, (1, 9), generator=torch.Generator())
    pos = torch.arange(9).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(plain[0](ids, pos, None), adapted[0](ids, pos, None))  # B = 0


def test_adapters_switch_off_for_the_reference(single_rank):
    model_cfg, ours, peft_model = _models(ALL)
    ids = torch.randint(0, model_cfg.vocab_size, (1, 9), generator=torch.Generator())
    pos = torch.arange(9).unsqueeze(0)
    with torch.no_grad():
        on = ours(ids, pos, None)
        with adapters_disabled([ours]):
            off = ours(ids, pos, None)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    assert not torch.allclose(on, off)
    assert torch.allclose(off[..., : model_cfg.vocab_size], base, atol=1e-5)


@pytest.mark.slow  # builds the 1.8B twice on the meta device (about 45 s on 2 cores)
def test_danube_1_8b_adapter_count_is_what_peft_reports(single_rank):
    """r=4 on all seven projections of the 1.8B (built on the meta device, no memory)."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    from megatron_danube.models.hf_adapter import mistral_config
    from megatron_danube.models.presets import get_preset

    model_cfg = get_preset("danube-1.8b")
    settings = LoraSettings(RANK, ALPHA, 0.0, resolve_targets(ALL))
    chunks = _lora_build(model_cfg, settings, device="meta")
    with torch.device("meta"):
        hf = MistralForCausalLM(mistral_config(model_cfg))
    peft_model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ALL))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert lora_parameter_count(chunks) == trainable == 4_325_376


def test_an_imported_peft_adapter_trains_and_exports_as_peft_does(single_rank, tmp_path):
    """A PEFT adapter (A and B random) imported: PEFT's loss and gradients; one SGD step on
    both sides; exported again, PEFT loads it and gives the megatron model's logits."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import MistralForCausalLM

    from megatron_danube.convert.lora_export import write_peft_adapter
    from megatron_danube.models.full_weights import full_named_parameters, load_full_weights
    from megatron_danube.models.hf_adapter import hf_to_mcore, mistral_config
    from megatron_danube.models.peft_adapter import read_adapter_config, read_adapter_weights
    from megatron_danube.models.presets import get_preset

    model_cfg = get_preset("danube-test")
    torch.manual_seed(1)
    hf = MistralForCausalLM(mistral_config(model_cfg, "eager"))
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    peft_model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=ALL))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(str(tmp_path / "imported"))
    config = read_adapter_config(str(tmp_path / "imported"))
    settings = LoraSettings(config["r"], config["lora_alpha"], 0.0, resolve_targets(ALL))
    initial = read_adapter_weights(str(tmp_path / "imported"))
    from megatron_danube.config import ParallelLayout
    from megatron_danube.training.model_build import build_model

    _, chunks = build_model(
        model_cfg,
        layout=ParallelLayout(),
        spec="local",
        device=torch.device("cpu"),
        pre_wrap=[lambda c: apply_lora(c, model_cfg, settings, initial)],
    )
    ours = chunks[0]
    full = full_named_parameters(ours)
    base = hf_to_mcore(dict(base_state), model_cfg)  # (it takes the tensors out)
    full.update({k: v for k, v in base.items() if k in full})
    load_full_weights([ours], full)  # the base; the adapters are the imported ones already

    ids = torch.randint(0, model_cfg.vocab_size, (2, 33), generator=torch.Generator())
    loss, ref = _loss(model_cfg, ours, peft_model, ids)
    assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
    loss.backward()
    ref.backward()
    theirs = {mcore_lora_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs)
    with torch.no_grad():
        for name, p in mine.items():
            scale = theirs[name].grad.abs().max()
            assert (p.grad - theirs[name].grad).abs().max() <= 1e-5 * scale + 1e-9, name
            p -= 0.5 * p.grad
            theirs[name] -= 0.5 * theirs[name].grad

    adapters = {k: v for k, v in full_named_parameters(ours).items() if ".lora_" in k}
    record = dict(rank=RANK, alpha=ALPHA, dropout=0.0)
    (tmp_path / "exported").mkdir()
    write_peft_adapter(adapters, record, str(tmp_path / "exported"), "base", torch.float32)
    fresh = MistralForCausalLM(mistral_config(model_cfg, "eager"))
    fresh.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(fresh, str(tmp_path / "exported")).eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
    with torch.no_grad():
        after = ours(ids, pos, None)[..., : model_cfg.vocab_size]
        assert (reloaded(input_ids=ids).logits - after).abs().max() < 1e-4
        assert (peft_model(input_ids=ids).logits - after).abs().max() < 1e-4


def test_base_weights_stay_bit_identical_through_optimizer_steps(single_rank):
    """Through megatron's DDP and AdamW (with weight decay): only the adapters move."""
    from megatron_danube.config.sections import OptimSection
    from megatron_danube.models.presets import get_preset
    from megatron_danube.training.model_build import build_model, wrap_for_training
    from megatron_danube.training.step import causal_lm_batch, train_step

    model_cfg = get_preset("danube-test")
    settings = LoraSettings(RANK, ALPHA, 0.0, resolve_targets(ALL))
    from megatron_danube.config import ParallelLayout

    config, chunks = build_model(
        model_cfg,
        layout=ParallelLayout(),
        spec="local",
        device=torch.device("cpu"),
        pre_wrap=[lambda c: apply_lora(c, model_cfg, settings)],
    )
    model = wrap_for_training(config, chunks, OptimSection(lr=0.01, weight_decay=0.1), 10_000)
    before = {n: p.detach().clone() for n, p in model.chunks[0].named_parameters()}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = causal_lm_batch(torch.randint(0, model_cfg.vocab_size, (1, 17), generator=gen))
        result = train_step(
            model.chunks,
            model.optimizer,
            [iter([batch])],
            num_microbatches=1,
            seq_length=16,
            micro_batch_size=1,
        )
        assert not result["skipped"]
    after = dict(model.chunks[0].named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert moved and all(".lora_linear_" in n for n in moved), moved[:3]
    assert sum(".lora_B" in n for n in moved) == 7 * model_cfg.num_layers  # every B left zero
