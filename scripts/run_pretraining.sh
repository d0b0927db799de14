#!/usr/bin/env bash
# Two-phase BERT pre-training (phase 1: seq 128, phase 2: seq 512) with the reference's 32 positional arguments.
# Shards are prepared from the Wikipedia source text first when a phase's data folder is empty. By default the
# phases read $BERT_PREP_WORKING_DIR/pretrain/phase1/unbinned/parquet/ and .../pretrain/phase2/bin_size_64/parquet/
# (what data/create_datasets_from_start.sh writes; BERT_PREP_WORKING_DIR defaults to <repository>/data), and
# phase2_bin_size (#30) is 64: none, 32, 64, 128, 256 or 512. KEEP_CHECKPOINTS (default 3) is how many of each
# phase's newest checkpoints are kept; phase 2 never deletes phase 1's.
# Usage: bash scripts/run_pretraining.sh [train_batch_size] [learning_rate] [precision] [num_gpus] ...
#        bash scripts/run_pretraining.sh $(source scripts/configs/pretrain_config.sh && dgxa100-80g_8gpu_fp16)
#        bash scripts/run_pretraining.sh $(source scripts/configs/pretrain_config.sh && cpu_demo)
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
default_gpus=$(count_gpus)
CODEDIR_DEFAULT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BERT_PREP_WORKING_DIR=${BERT_PREP_WORKING_DIR:-$CODEDIR_DEFAULT/data}

train_batch_size=${1:-8192}
learning_rate=${2:-"6e-3"}
precision=${3:-"fp16"}
num_gpus=${4:-$default_gpus}
warmup_proportion=${5:-"0.2843"}
train_steps=${6:-7038}
save_checkpoint_steps=${7:-200}
resume_training=${8:-"false"}
create_logfile=${9:-"true"}
accumulate_gradients=${10:-"true"}
gradient_accumulation_steps=${11:-128}
seed=${12:-12439}
job_name=${13:-"bert_lamb_pretraining"}
allreduce_post_accumulation=${14:-"true"}
allreduce_post_accumulation_fp16=${15:-"true"}
train_batch_size_phase2=${16:-4096}
learning_rate_phase2=${17:-"4e-3"}
warmup_proportion_phase2=${18:-"0.128"}
train_steps_phase2=${19:-1563}
gradient_accumulation_steps_phase2=${20:-512}
DATA_DIR_PHASE1=${21:-$BERT_PREP_WORKING_DIR/pretrain/phase1/unbinned/parquet/}
DATA_DIR_PHASE2=${22:-$BERT_PREP_WORKING_DIR/pretrain/phase2/bin_size_64/parquet/}
CODEDIR=${23:-$CODEDIR_DEFAULT}
init_checkpoint=${24:-"None"}
wikipedia_source=${25:-$BERT_PREP_WORKING_DIR/wikipedia/source/}
num_dask_workers=${26:-$(nproc)}
num_shards_per_worker=${27:-128}
num_workers=${28:-4}
sample_ratio=${29:-0.9}
phase2_bin_size=${30:-64}
masking=${31:-"static"}
BERT_CONFIG=${32:-bert_configs/large.json}

case "$phase2_bin_size" in
  none|32|64|128|256|512) ;;
  *) echo "run_pretraining.sh: phase2_bin_size (argument 30) must be none, 32, 64, 128, 256 or 512," \
       "got '$phase2_bin_size'" >&2; exit 1 ;;
esac

VOCAB_FILE=${VOCAB_FILE:-vocab/vocab}
RESULTS_DIR=${RESULTS_DIR:-$CODEDIR/results}
CHECKPOINTS_DIR=${CHECKPOINTS_DIR:-$RESULTS_DIR/checkpoints}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-3}
PYTHON=${PYTHON:-python3}
num_nodes=${SLURM_JOB_NUM_NODES:-1}
cd "$CODEDIR"
mkdir -p "$CHECKPOINTS_DIR"

setup_device run_pretraining.sh "$precision" "$num_gpus"
[ "$procs" -eq 1 ] && [ "${#DEVICE[@]}" -gt 0 ] && echo "No GPU found: running on the CPU in one process."
ACCUMULATE=(); ACCUMULATE2=()
if [ "$accumulate_gradients" = "true" ]; then
  ACCUMULATE=(--gradient_accumulation_steps="$gradient_accumulation_steps")
  ACCUMULATE2=(--gradient_accumulation_steps="$gradient_accumulation_steps_phase2")
fi
ALL_REDUCE=()
[ "$allreduce_post_accumulation" = "true" ] && ALL_REDUCE=(--allreduce_post_accumulation)
[ "$allreduce_post_accumulation_fp16" = "true" ] && ALL_REDUCE+=(--allreduce_post_accumulation_fp16)
RESUME=(); [ "$resume_training" = "true" ] && RESUME=(--resume_from_checkpoint)
INIT=(); [ "$init_checkpoint" != "None" ] && INIT=(--init_checkpoint="$init_checkpoint")
num_blocks=$((num_shards_per_worker * (num_workers > 1 ? num_workers : 1) * num_nodes * (procs > 1 ? procs : 1)))

set_launcher

prepare_shards() {  # $1 = output folder, $2 = target sequence length, $3 = bin size or "none"
  if [ -d "$1" ] && [ -n "$(ls -A "$1" 2>/dev/null)" ]; then return; fi
  echo "Preparing shards in $1 from $wikipedia_source (seq $2)"
  local extra=()
  [ "$3" != "none" ] && extra+=(--bin-size "$3")
  [ "$masking" = "static" ] && extra+=(--masking)
  "$PYTHON" -m data.preprocess_pretraining --wikipedia "$wikipedia_source" --sink "$1" --vocab-file "$VOCAB_FILE" \
    --target-seq-length "$2" --num-blocks "$num_blocks" --sample-ratio "$sample_ratio" --seed "$seed" \
    --local-n-workers "$num_dask_workers" "${extra[@]}"
}

run_phase() {  # $1 = phase name, rest = arguments of run_pretraining.py
  local name=$1; shift
  local logfile=/dev/null
  if [ "$create_logfile" = "true" ]; then
    local gbs=$((train_batch_size * procs))
    logfile=$RESULTS_DIR/$job_name.pyt_bert_pretraining_${name}_${precision}_gbs$gbs.$(date +%y%m%d%H%M%S).log
  fi
  echo "${LAUNCH[*]} run_pretraining.py $*"
  set -o pipefail
  "${LAUNCH[@]}" run_pretraining.py "$@" 2>&1 | tee "$logfile"
}

prepare_shards "$DATA_DIR_PHASE1" 128 none
run_phase phase1 --input_dir="$DATA_DIR_PHASE1" --output_dir="$CHECKPOINTS_DIR" --config_file="$BERT_CONFIG" \
  --vocab_file="$VOCAB_FILE" --train_batch_size="$train_batch_size" --max_seq_length=128 \
  --max_predictions_per_seq=20 --max_steps="$train_steps" --warmup_proportion="$warmup_proportion" \
  --num_steps_per_checkpoint="$save_checkpoint_steps" --keep_checkpoints="$KEEP_CHECKPOINTS" \
  --learning_rate="$learning_rate" --seed="$seed" --json-summary "$RESULTS_DIR/dllogger.json" \
  --disable_progress_bar --num_workers="$num_workers" --do_train "${PREC[@]}" "${DEVICE[@]}" "${ACCUMULATE[@]}" \
  "${ALL_REDUCE[@]}" "${RESUME[@]}" "${INIT[@]}"
echo "finished pretraining"

prepare_shards "$DATA_DIR_PHASE2" 512 "$phase2_bin_size"
run_phase phase2 --input_dir="$DATA_DIR_PHASE2" --output_dir="$CHECKPOINTS_DIR" --config_file="$BERT_CONFIG" \
  --vocab_file="$VOCAB_FILE" --train_batch_size="$train_batch_size_phase2" --max_seq_length=512 \
  --max_predictions_per_seq=80 --max_steps="$train_steps_phase2" --warmup_proportion="$warmup_proportion_phase2" \
  --num_steps_per_checkpoint="$save_checkpoint_steps" --keep_checkpoints="$KEEP_CHECKPOINTS" \
  --learning_rate="$learning_rate_phase2" --seed="$seed" --json-summary "$RESULTS_DIR/dllogger.json" \
  --disable_progress_bar --num_workers="$num_workers" --do_train --phase2 --resume_from_checkpoint \
  --phase1_end_step="$train_steps" "${PREC[@]}" "${DEVICE[@]}" "${ACCUMULATE2[@]}" "${ALL_REDUCE[@]}"
echo "finished phase2"
