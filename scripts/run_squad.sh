#!/usr/bin/env bash
# SQuAD fine-tuning / prediction / evaluation with the reference's 14 positional arguments (era-B order).
# Usage: bash scripts/run_squad.sh [init_checkpoint] [epochs] [batch_size] [learning_rate] [warmup_proportion]
#          [precision] [num_gpu] [seed] [squad_dir] [vocab_file] [OUT_DIR] [mode] [CONFIG_FILE] [max_steps]
#        bash scripts/run_squad.sh $(source scripts/configs/squad_config.sh && dgxa100-80g_8gpu_fp16)
#        bash scripts/run_squad.sh $(source scripts/configs/squad_config.sh && cpu_demo)
# mode: "train" (fine-tune only), "eval" (predict and score), "prediction" (predict only); anything else, e.g. the
# default "train eval", does all three, as the reference. squad_dir holds train-v1.1.json and dev-v1.1.json (or,
# for SQuAD v2.0, train-v2.0.json and dev-v2.0.json); scores come from run_squad.py's built-in official metrics,
# plus squad_dir/evaluate-v1.1.py (or evaluate-v2.0.py) when that script is there. precision: fp16, bf16, tf32 or
# fp32. num_gpu 0 runs on the CPU; 1 runs one process; more run torchrun (training only: prediction runs on one
# process). Output is also written to OUT_DIR/logfile.txt.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
default_gpus=$(count_gpus)
CODEDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERT_PREP_WORKING_DIR=${BERT_PREP_WORKING_DIR:-$CODEDIR/data}

init_checkpoint=${1:-"$CODEDIR/checkpoints/bert_uncased.pt"}
epochs=${2:-"2.0"}
batch_size=${3:-"4"}
learning_rate=${4:-"3e-5"}
warmup_proportion=${5:-"0.1"}
precision=${6:-"fp16"}
num_gpu=${7:-$default_gpus}
seed=${8:-"1"}
squad_dir=${9:-"$BERT_PREP_WORKING_DIR/download/squad/v1.1"}
vocab_file=${10:-"$CODEDIR/vocab/vocab"}
OUT_DIR=${11:-"$CODEDIR/results/SQuAD"}
mode=${12:-"train eval"}
CONFIG_FILE=${13:-"$CODEDIR/bert_configs/large.json"}
max_steps=${14:-"-1"}
PYTHON=${PYTHON:-python3}

setup_device run_squad.sh "$precision" "$num_gpu"

if [ -f "$squad_dir/train-v1.1.json" ] || [ -f "$squad_dir/dev-v1.1.json" ]; then
  version=v1.1; VERSION_FLAGS=()
elif [ -f "$squad_dir/train-v2.0.json" ] || [ -f "$squad_dir/dev-v2.0.json" ]; then
  version=v2.0; VERSION_FLAGS=(--version_2_with_negative)
else
  echo "run_squad.sh: $squad_dir holds neither train-v1.1.json/dev-v1.1.json nor train-v2.0.json/dev-v2.0.json" >&2
  exit 1
fi
TRAIN=(--do_train --train_file "$squad_dir/train-$version.json" --train_batch_size "$batch_size")
PREDICT=(--do_predict --predict_file "$squad_dir/dev-$version.json" --predict_batch_size "$batch_size")
EVAL=(--do_eval)
[ -f "$squad_dir/evaluate-$version.py" ] && EVAL+=(--eval_script "$squad_dir/evaluate-$version.py")
case "$mode" in
  train) MODE=("${TRAIN[@]}") ;;
  eval) MODE=("${PREDICT[@]}" "${EVAL[@]}"); procs=$((procs > 1 ? 1 : procs)) ;;
  prediction) MODE=("${PREDICT[@]}"); procs=$((procs > 1 ? 1 : procs)) ;;
  *) MODE=("${TRAIN[@]}" "${PREDICT[@]}" "${EVAL[@]}") ;;
esac

set_launcher

mkdir -p "$OUT_DIR"
CMD=("${LAUNCH[@]}" "$CODEDIR/run_squad.py"
  --init_checkpoint "$init_checkpoint" --num_train_epochs "$epochs" --learning_rate "$learning_rate"
  --warmup_proportion "$warmup_proportion" --seed "$seed" --max_steps "$max_steps"
  --config_file "$CONFIG_FILE" --vocab_file "$vocab_file" --output_dir "$OUT_DIR"
  --do_lower_case --bert_model bert-large-uncased --max_seq_length 384 --doc_stride 128
  --json-summary "$OUT_DIR/dllogger.json" --disable-progress-bar
  "${MODE[@]}" "${VERSION_FLAGS[@]}" "${PREC[@]}" "${DEVICE[@]}")
echo "${CMD[*]}" | tee "$OUT_DIR/logfile.txt"
"${CMD[@]}" 2>&1 | tee -a "$OUT_DIR/logfile.txt"
