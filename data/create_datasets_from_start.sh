#!/usr/bin/env bash
# Build every dataset of the recipe from nothing: download Wikipedia, SQuAD, GLUE and the uncased vocab, extract
# the Wikipedia articles, then write the phase-1 (seq 128) and phase-2 (seq 512, bins of 64) Parquet shards that
# run_pretraining.sh reads, and optionally the era-A HDF5 files.
# Each step is skipped when its output is already complete, so a rerun after a failure continues where it stopped
# (downloads resume mid-file).
#
# Usage: bash data/create_datasets_from_start.sh [num_workers] [num_blocks] [masking] [hdf5] [sample_ratio] [seed]
#   num_workers   processes for extraction and Dask preprocessing        (default: $(nproc))
#   num_blocks    Parquet shards per phase; make it a multiple of
#                 GPUs x loader workers (reference: 128 x 4 x GPUs)       (default: 4096)
#   masking       static (masks stored in the shards) or dynamic          (default: static)
#   hdf5          true: also write era-A HDF5 shards for both phases      (default: false)
#   sample_ratio  fraction of Wikipedia documents kept                    (default: 0.9)
#   seed          preprocessing seed                                      (default: 12345)
# Environment: BERT_PREP_WORKING_DIR (default: $PWD/data), BERT_DATA_MIRROR (mirror for every download, see
# `python -m data.download --help`), PYTHON (default: python3).
set -euo pipefail

num_workers=${1:-$(nproc)}
num_blocks=${2:-4096}
masking=${3:-static}
hdf5=${4:-false}
sample_ratio=${5:-0.9}
seed=${6:-12345}

WD=${BERT_PREP_WORKING_DIR:-$PWD/data}
PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "create_datasets_from_start.sh: $*" >&2; exit 1; }
case "$masking" in static|dynamic) ;; *) die "masking must be 'static' or 'dynamic', got '$masking'" ;; esac
case "$hdf5" in true|false) ;; *) die "hdf5 must be 'true' or 'false', got '$hdf5'" ;; esac
[[ "$num_workers" =~ ^[1-9][0-9]*$ ]] || die "num_workers must be a positive integer, got '$num_workers'"
[[ "$num_blocks" =~ ^[1-9][0-9]*$ ]] || die "num_blocks must be a positive integer, got '$num_blocks'"

DUMP=$WD/wikipedia/wikicorpus-en.xml.bz2
SOURCE=$WD/wikipedia/source
VOCAB=$WD/download/google_pretrained_weights/uncased_L-24_H-1024_A-16/vocab.txt
PHASE1=$WD/pretrain/phase1/unbinned/parquet
PHASE2=$WD/pretrain/phase2/bin_size_64/parquet
echo "Working directory: $WD"

step() { echo; echo "=== $* ==="; }

step "Downloading Wikipedia, SQuAD v1.1/v2.0, GLUE and the uncased vocab"
"$PYTHON" -m data.download --dataset wikicorpus_en squad glue vocab --outdir "$WD"

step "Extracting Wikipedia articles into $SOURCE"
if [ -n "$(ls -A "$SOURCE" 2>/dev/null)" ]; then
  echo "$SOURCE is not empty: skipping (delete it to extract again)"
else
  "$PYTHON" -m data.extract_wikipedia --input "$DUMP" --output-dir "$SOURCE" --num-workers "$num_workers"
fi

parquet_shards() {  # $1 = sink, $2 = target sequence length, rest = extra flags
  local sink=$1 seq_len=$2; shift 2
  step "Writing seq-$seq_len Parquet shards into $sink"
  if [ -f "$sink/.num_samples.json" ]; then
    echo "$sink is complete (.num_samples.json present): skipping"
    return
  fi
  if [ -n "$(ls -A "$sink" 2>/dev/null)" ]; then
    die "$sink holds files from an unfinished run; delete the folder and run this script again"
  fi
  local extra=("$@")
  [ "$masking" = "static" ] && extra+=(--masking)
  "$PYTHON" -m data.preprocess_pretraining --wikipedia "$SOURCE" --sink "$sink" --vocab-file "$VOCAB" \
    --target-seq-length "$seq_len" --num-blocks "$num_blocks" --sample-ratio "$sample_ratio" --seed "$seed" \
    --local-n-workers "$num_workers" ${extra[@]+"${extra[@]}"}
}

parquet_shards "$PHASE1" 128
parquet_shards "$PHASE2" 512 --bin-size 64

if [ "$hdf5" = "true" ]; then
  for spec in "128 20" "512 80"; do
    read -r seq_len max_pred <<< "$spec"
    out=$WD/hdf5/seq_${seq_len}_pred_${max_pred}
    step "Writing seq-$seq_len HDF5 shards into $out"
    if [ -n "$(ls -A "$out" 2>/dev/null)" ]; then
      echo "$out is not empty: skipping (delete it to write again)"
      continue
    fi
    "$PYTHON" -m data.create_pretraining_data --input-dir "$SOURCE" --output-dir "$out" --vocab-file "$VOCAB" \
      --max-seq-length "$seq_len" --max-predictions-per-seq "$max_pred" --num-shards "$num_blocks" \
      --num-workers "$num_workers" --random-seed "$seed"
  done
fi

echo
echo "Done. Phase 1: $PHASE1"
echo "      Phase 2: $PHASE2"
echo "      SQuAD:   $WD/download/squad   GLUE: $WD/download/glue   vocab: $VOCAB"
