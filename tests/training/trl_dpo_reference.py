"""TRL's DPOTrainer on an HF model directory: 2 SGD steps over one batch of all pairs.

    python trl_dpo_reference.py MODEL_DIR PAIRS.jsonl OUT.json BETA LR [ADAPTER_DIR HOW]

Writes TRL's per-step log (loss, rewards/*, logps/*, grad_norm) as JSON. Run in its own
process so that TRL/accelerate state never touches the test process. With a PEFT adapter
directory, LoRA trains from its A and B: HOW=peft_config gives the trainer a `peft_config` (its
reference: the adapters off) and loads the adapter's values into the model it makes;
HOW=peft_model hands it the loaded `PeftModel` (its reference: a frozen copy of the adapter).
"""

import json
import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer


def main(model_dir, pairs_path, out_path, beta, lr, adapter_dir=None, how=None):
    records = [json.loads(line) for line in open(pairs_path)]
    # TRL's conversational format: the same template renders prompt and completions.
    data = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(
        output_dir=out_path + ".trl",
        beta=float(beta),
        learning_rate=float(lr),
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=2,
        per_device_train_batch_size=len(records),
        gradient_accumulation_steps=1,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_length=None,
        seed=0,
        precompute_ref_log_probs=False,
    )
    peft_config = None
    if how == "peft_config":
        from peft import LoraConfig

        saved = json.load(open(f"{adapter_dir}/adapter_config.json"))
        peft_config = LoraConfig(
            r=saved["r"],
            lora_alpha=saved["lora_alpha"],
            lora_dropout=0.0,
            target_modules=saved["target_modules"],
            task_type="CAUSAL_LM",
        )
    elif how == "peft_model":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if how == "peft_config":
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        values = load_file(f"{adapter_dir}/adapter_model.safetensors")
        result = set_peft_model_state_dict(trainer.model, values)
        assert not result.unexpected_keys, result.unexpected_keys
    trainer.train()
    steps = [h for h in trainer.state.log_history if "rewards/chosen" in h]
    with open(out_path, "w") as f:
        json.dump(steps, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
