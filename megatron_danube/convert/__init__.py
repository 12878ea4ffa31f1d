"""Checkpoint conversion between megatron_danube and Hugging Face, and logit comparison."""
