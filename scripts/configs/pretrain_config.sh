#!/usr/bin/env bash
# Per-system settings for scripts/run_pretraining.sh. Source this file in bash, then call one function: it echoes
# the 32 positional arguments, e.g.
#   bash scripts/run_pretraining.sh $(source scripts/configs/pretrain_config.sh && dgxa100-80g_8gpu_fp16)
# The reference's current names (dgxa100-80g_*, dgx1-32g_*) and its earlier ones (dgxa10080g_*, dgxa100_*, dgx2_*,
# dgx1_*) all work, with the reference's values. Names with a hyphen need bash (not sh, not bash --posix).
# Paths: CODEDIR (#23) is this repository (the reference's /workspace/bert); the data folders are under
# $BERT_PREP_WORKING_DIR (default: <repository>/data), where data/create_datasets_from_start.sh writes them.

_pretrain_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# $1 batch  $2 precision  $3 gpus  $4 accum  $5 batch phase 2  $6 accum phase 2  $7 allreduce fp16  $8 dask workers
_pretrain_args() {
  local wd=${BERT_PREP_WORKING_DIR:-$_pretrain_root/data}
  local args=(
    "$1" 6e-3 "$2" "$3" 0.2843 7038 200 false true true "$4" 42 bert_lamb_pretraining true "$7"
    "$5" 4e-3 0.128 1563 "$6"
    "$wd/pretrain/phase1/unbinned/parquet/" "$wd/pretrain/phase2/bin_size_64/parquet/" "$_pretrain_root" None
    "$wd/wikipedia/source/" "$8" 128 4 0.9 64 static bert_configs/large.json
  )
  echo "${args[@]}"
}

# The reference's current functions: DGX A100 80GB and DGX-1 32GB (V100 32GB), 8 GPUs each.
dgxa100-80g_8gpu_fp16() { _pretrain_args 8192 fp16 8 32 4096 128 true 128; }
dgxa100-80g_8gpu_tf32() { _pretrain_args 8192 tf32 8 64 4096 256 false 128; }
dgx1-32g_8gpu_fp16()    { _pretrain_args 8192 fp16 8 64 4096 256 true 128; }
dgx1-32g_8gpu_fp32()    { _pretrain_args 8192 fp32 8 128 4096 512 false 128; }

# The reference's earlier names: A100 80GB (same values as above), A100 40GB, DGX-2 (16x V100 32GB) and
# DGX-1 (8x V100 16GB, hence more accumulation than dgx1-32g_*).
dgxa10080g_8gpu_fp16() { dgxa100-80g_8gpu_fp16; }
dgxa10080g_8gpu_tf32() { dgxa100-80g_8gpu_tf32; }
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
  local out=${RESULTS_DIR:-$_pretrain_root/results}/cpu_demo_data
  local args=(
    32 1e-2 fp32 0 0.1 150 50 false true false 1 42 bert_cpu_demo false false
    8 5e-3 0.1 20 1
    "$out/phase1/parquet/" "$out/phase2/parquet/" "$_pretrain_root" None
    "$_pretrain_root/data/sample/source/" 2 4 1 1.0 none dynamic bert_configs/tiny.json
  )
  echo "${args[@]}"
}
