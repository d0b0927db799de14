#!/usr/bin/env bash
# Per-system settings for scripts/run_pretraining.sh. Source this file, then call one function: it echoes the
# 32 positional arguments, e.g.  bash scripts/run_pretraining.sh $(source scripts/configs/pretrain_config.sh && dgxa100_8gpu_fp16)

_pretrain_args() {
  # $1 batch  $2 precision  $3 gpus  $4 accum  $5 batch phase 2  $6 accum phase 2  $7 allreduce fp16  $8 dask workers
  local wd=${BERT_PREP_WORKING_DIR:-$PWD/data}
  local args=(
    "$1" 6e-3 "$2" "$3" 0.2843 7038 200 false true true "$4" 42 bert_lamb_pretraining true "$7"
    "$5" 4e-3 0.128 1563 "$6"
    "$wd/pretrain/phase1/unbinned/parquet/" "$wd/pretrain/phase2/bin_size_64/parquet/" "$PWD" None
    "$wd/wikipedia/source/" "$8" 128 4 0.9 64 static bert_configs/large.json
  )
  echo "${args[@]}"
}

dgxa10080g_8gpu_fp16() { _pretrain_args 8192 fp16 8 32 4096 128 true 128; }
dgxa10080g_8gpu_tf32() { _pretrain_args 8192 tf32 8 64 4096 256 false 128; }
dgxa100_8gpu_fp16()    { _pretrain_args 8192 fp16 8 128 4096 256 true 128; }
dgxa100_8gpu_tf32()    { _pretrain_args 8192 tf32 8 128 4096 512 false 128; }
dgx2_16gpu_fp16()      { _pretrain_args 4096 fp16 16 64 2048 256 true 64; }
dgx2_16gpu_fp32()      { _pretrain_args 4096 fp32 16 128 2048 512 false 64; }
dgx1_8gpu_fp16()       { _pretrain_args 8192 fp16 8 512 4096 1024 true 64; }
dgx1_8gpu_fp32()       { _pretrain_args 8192 fp32 8 1024 4096 2048 false 64; }

# Beyond the reference: modern single GPUs in bf16 (no loss scaling needed).
h100_1gpu_bf16()       { _pretrain_args 8192 bf16 1 32 4096 128 false "$(nproc)"; }

# Both phases on a 2-core CPU in a few minutes: the tiny config on the bundled sample corpus (data/sample).
cpu_demo() {
  local out=${RESULTS_DIR:-$PWD/results}/cpu_demo_data
  local args=(
    32 1e-2 fp32 0 0.1 150 50 false true false 1 42 bert_cpu_demo false false
    8 5e-3 0.1 20 1
    "$out/phase1/parquet/" "$out/phase2/parquet/" "$PWD" None
    "$PWD/data/sample/source/" 2 4 1 1.0 none dynamic bert_configs/tiny.json
  )
  echo "${args[@]}"
}
