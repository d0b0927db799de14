#!/usr/bin/env bash
# GLUE fine-tuning / evaluation / prediction with the reference's 16 positional arguments.
# Usage: bash scripts/run_glue.sh [init_checkpoint] [data_dir] [vocab_file] [config_file] [out_dir] [task_name]
#          [num_gpu] [batch_size] [gradient_accumulation_steps] [learning_rate] [warmup_proportion] [epochs]
#          [max_steps] [precision] [seed] [mode]
#        bash scripts/run_glue.sh $(source scripts/configs/glue_config.sh && mrpc_dgxa100-80g_8gpu_fp16)
#        bash scripts/run_glue.sh $(source scripts/configs/glue_config.sh && cpu_demo)
# mode holds any of "train", "eval", "prediction" (substring match; default "train eval"). precision is fp16,
# bf16, tf32 or fp32. num_gpu 0 runs on the CPU; without "train" in mode one process is used (evaluation and
# prediction run on one rank). Output and errors are also written to <out_dir>/logfile.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
default_gpus=$(count_gpus)
CODEDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERT_PREP_WORKING_DIR=${BERT_PREP_WORKING_DIR:-$CODEDIR/data}

init_checkpoint=${1:-"$CODEDIR/checkpoints/bert_uncased.pt"}
data_dir=${2:-"$BERT_PREP_WORKING_DIR/download/glue/MRPC/"}
vocab_file=${3:-"$CODEDIR/vocab/vocab"}
config_file=${4:-"$CODEDIR/bert_configs/large.json"}
out_dir=${5:-"$CODEDIR/results/MRPC"}
task_name=${6:-"mrpc"}
num_gpu=${7:-$default_gpus}
batch_size=${8:-"16"}
gradient_accumulation_steps=${9:-"1"}
learning_rate=${10:-"2.4e-5"}
warmup_proportion=${11:-"0.1"}
epochs=${12:-"3"}
max_steps=${13:-"-1.0"}
precision=${14:-"fp16"}
seed=${15:-"2"}
mode=${16:-"train eval"}
PYTHON=${PYTHON:-python3}

setup_device run_glue.sh "$precision" "$num_gpu"

MODE=()
[[ "$mode" == *train* ]] && MODE+=(--do_train)
[[ "$mode" == *eval* ]] && MODE+=(--do_eval)
[[ "$mode" == *prediction* ]] && MODE+=(--do_predict)
if [ ${#MODE[@]} -eq 0 ]; then
  echo "run_glue.sh: mode '$mode' names none of train, eval, prediction" >&2; exit 1
fi
[[ "$mode" != *train* ]] && procs=1  # evaluation and prediction run on the main process only

set_launcher

mkdir -p "$out_dir"
CMD=("${LAUNCH[@]}" "$CODEDIR/run_glue.py"
  --init_checkpoint "$init_checkpoint" --data_dir "$data_dir" --vocab_file "$vocab_file"
  --config_file "$config_file" --output_dir "$out_dir" --task_name "$task_name"
  --train_batch_size "$batch_size" --gradient_accumulation_steps "$gradient_accumulation_steps"
  --eval_batch_size "$batch_size" --learning_rate "$learning_rate" --warmup_proportion "$warmup_proportion"
  --num_train_epochs "$epochs" --max_steps "$max_steps" --seed "$seed"
  --do_lower_case --bert_model bert-large-uncased --max_seq_length 128
  --json-summary "$out_dir/dllogger.json" --disable_progress_bar
  "${MODE[@]}" "${PREC[@]}" "${DEVICE[@]}")
echo "${CMD[*]}" | tee "$out_dir/logfile"
"${CMD[@]}" 2>&1 | tee -a "$out_dir/logfile"
