#!/usr/bin/env bash
# The whole recipe on a 2-core CPU in a few minutes, on bundled data: pre-training phases 1 and 2 of a tiny BERT,
# SQuAD and GLUE fine-tuning from its last checkpoint, then one question to inference.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export RESULTS_DIR=${RESULTS_DIR:-$PWD/results/cpu_demo}
# Start clean, but delete only a folder an earlier demo made (it holds the marker), never a user's folder.
if [ -n "$(ls -A "$RESULTS_DIR" 2>/dev/null)" ]; then
  if [ ! -f "$RESULTS_DIR/.cpu_demo" ]; then
    echo "cpu_demo.sh: error: RESULTS_DIR $RESULTS_DIR is not empty and was not made by this demo" >&2
    exit 1
  fi
  rm -rf "$RESULTS_DIR"
fi
mkdir -p "$RESULTS_DIR"
touch "$RESULTS_DIR/.cpu_demo"

bash scripts/run_pretraining.sh $(source scripts/configs/pretrain_config.sh && cpu_demo)
ckpt=$(ls "$RESULTS_DIR"/checkpoints/ckpt_*.pt | sort -t_ -k2 -n | tail -n 1)
echo "Pre-trained checkpoint: $ckpt"

bash scripts/run_squad.sh $(source scripts/configs/squad_config.sh && cpu_demo "$ckpt")
bash scripts/run_glue.sh $(source scripts/configs/glue_config.sh && cpu_demo "$ckpt")

python3 inference.py --init_checkpoint "$RESULTS_DIR/SQuAD/pytorch_model.bin" \
  --config_file "$RESULTS_DIR/SQuAD/config.json" --vocab_file vocab/vocab --do_lower_case \
  --question "What do antibiotics kill?" \
  --context "Antibiotics are medicines that kill bacteria or stop them from growing. They do not work against viruses."
echo "CPU demo finished: checkpoints, logs and predictions are in $RESULTS_DIR"
