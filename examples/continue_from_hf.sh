#!/usr/bin/env bash
# Continue pretraining from released Hugging Face weights (how Danube2 started from Danube-1.8B):
# convert the HF directory to a megatron_danube checkpoint, then start a run from its weights
# (fresh optimizer, schedule and data position).
#
#   examples/continue_from_hf.sh HF_DIR RUN_CONFIG [key=value ...]
#   examples/continue_from_hf.sh /models/h2o-danube-1.8b-base examples/configs/danube2-1.8b.yaml
set -euo pipefail
HF_DIR=${1:?usage: continue_from_hf.sh HF_DIR RUN_CONFIG [key=value ...]}
CONFIG=${2:?usage: continue_from_hf.sh HF_DIR RUN_CONFIG [key=value ...]}
shift 2
MCORE_DIR=${MCORE_DIR:-checkpoints/$(basename "$HF_DIR")-mcore}
NPROC=${NPROC:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}

if [[ ! -f "$MCORE_DIR/train_state.json" ]]; then
    danube-convert --to mcore --load "$HF_DIR" --save "$MCORE_DIR"
fi
danube-launch --nproc-per-node "$NPROC" -m megatron_danube.pretrain --config "$CONFIG" \
    checkpoint.load="$MCORE_DIR" checkpoint.load_optimizer=false "$@"
