#!/usr/bin/env bash
# Export a run's latest checkpoint (any TP/PP/DP, TE or local spec) as a Hugging Face
# MistralForCausalLM directory, then check it against the megatron model by logits.
#
#   examples/convert_to_hf.sh RUN_DIR HF_OUT [--dtype bfloat16]
set -euo pipefail
RUN_DIR=${1:?usage: convert_to_hf.sh RUN_DIR HF_OUT [--dtype ...]}
HF_OUT=${2:?usage: convert_to_hf.sh RUN_DIR HF_OUT [--dtype ...]}
shift 2
danube-convert --to hf --load "$RUN_DIR" --save "$HF_OUT" "$@"
danube-compare --hf "$HF_OUT" --mcore "$RUN_DIR"
