#!/usr/bin/env bash
# SWAG multiple-choice fine-tuning / evaluation with the reference's 8 positional arguments.
# Usage: bash scripts/run_swag.sh [init_checkpoint] [mode] [max_steps] [batch_size] [learning_rate] [precision]
#          [num_gpu] [epochs]
# Defaults are the reference's: mode "train", max_steps -1.0 (epochs decide), batch_size 12, learning_rate 5e-6,
# precision fp32, num_gpu 8, epochs 2; num_gpu defaults to at most the GPUs present, and 0 (no GPU) runs on the CPU.
# mode holds "train", "eval" or both (substring match, e.g. "train eval"); batch_size is the training batch per GPU
# and the evaluation batch. Evaluation alone runs one process. precision is fp16, bf16, tf32 or fp32.
# Environment: SWAG_DIR (default $BERT_PREP_WORKING_DIR/swag; its data/ holds the authors' train.csv and val.csv,
# the reference's layout), OUT_DIR (default $RESULTS_DIR/SWAG, RESULTS_DIR defaulting to results/), VOCAB_FILE and
# CONFIG_FILE (default vocab/vocab and bert_configs/large.json), PYTHON. Output is also written to OUT_DIR/logfile.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
default_gpus=$(count_gpus)
CODEDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERT_PREP_WORKING_DIR=${BERT_PREP_WORKING_DIR:-$CODEDIR/data}
SWAG_DIR=${SWAG_DIR:-$BERT_PREP_WORKING_DIR/swag}
OUT_DIR=${OUT_DIR:-${RESULTS_DIR:-$CODEDIR/results}/SWAG}
VOCAB_FILE=${VOCAB_FILE:-$CODEDIR/vocab/vocab}
CONFIG_FILE=${CONFIG_FILE:-$CODEDIR/bert_configs/large.json}

init_checkpoint=${1:-"$CODEDIR/checkpoints/bert_uncased.pt"}
mode=${2:-"train"}
max_steps=${3:-"-1.0"}
batch_size=${4:-"12"}
learning_rate=${5:-"5e-6"}
precision=${6:-"fp32"}
num_gpu=${7:-$((default_gpus < 8 ? default_gpus : 8))}
epochs=${8:-"2"}
PYTHON=${PYTHON:-python3}

setup_device run_swag.sh "$precision" "$num_gpu"

MODE=()
[[ "$mode" == *train* ]] && MODE+=(--do_train)
[[ "$mode" == *eval* ]] && MODE+=(--do_eval)
if [ ${#MODE[@]} -eq 0 ]; then
  echo "run_swag.sh: mode '$mode' names neither train nor eval" >&2; exit 1
fi
[[ "$mode" != *train* ]] && procs=1  # evaluation runs on the main process only

set_launcher

mkdir -p "$OUT_DIR"
CMD=("${LAUNCH[@]}" "$CODEDIR/run_swag.py"
  --init_checkpoint "$init_checkpoint" --data_dir "$SWAG_DIR/data/" --vocab_file "$VOCAB_FILE"
  --config_file "$CONFIG_FILE" --output_dir "$OUT_DIR"
  --train_batch_size "$batch_size" --eval_batch_size "$batch_size" --learning_rate "$learning_rate"
  --num_train_epochs "$epochs" --max_steps "$max_steps"
  --do_lower_case --bert_model bert-large-uncased --max_seq_length 128
  --json-summary "$OUT_DIR/dllogger.json" --disable_progress_bar
  "${MODE[@]}" "${PREC[@]}" "${DEVICE[@]}")
echo "${CMD[*]}" | tee "$OUT_DIR/logfile"
"${CMD[@]}" 2>&1 | tee -a "$OUT_DIR/logfile"
