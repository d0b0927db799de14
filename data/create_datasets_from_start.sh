#!/usr/bin/env bash
# Build every dataset of the recipe from nothing: download Wikipedia, SQuAD, GLUE and the uncased vocab, extract
# the Wikipedia articles, then write the phase-1 (seq 128) and phase-2 (seq 512, bins of 64) Parquet shards that
# run_pretraining.sh reads (LDDL layout, reference era B).
# Each step is skipped when its output is already complete, so a rerun after a failure continues where it stopped
# (downloads resume mid-file).
#
# Usage: bash data/create_datasets_from_start.sh [num_workers] [num_blocks] [masking] [sample_ratio] [seed]
#   num_workers   processes for extraction and Dask preprocessing        (default: $(nproc))
#   num_blocks    Parquet shards per phase; make it a multiple of
#                 GPUs x loader workers (reference: 128 x 4 x GPUs)       (default: 4096)
#   masking       static (masks stored in the shards) or dynamic          (default: static)
#   sample_ratio  fraction of Wikipedia documents kept                    (default: 0.9)
#   seed          preprocessing seed                                      (default: 12345)
# Environment: BERT_PREP_WORKING_DIR (default: $PWD/data), BERT_DATA_MIRROR (mirror for every download, see
# `python -m data.download --help`), PYTHON (default: python3).
set -euo pipefail

num_workers=${1:-$(nproc)}
num_blocks=${2:-4096}
masking=${3:-static}
sample_ratio=${4:-0.9}
seed=${5:-12345}

WD=${BERT_PREP_WORKING_DIR:-$PWD/data}
PYTHON=${PYTHON:-python3}
REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "create_datasets_from_start.sh: $*" >&2; exit 1; }
case "$masking" in static|dynamic) ;; *) die "masking must be 'static' or 'dynamic', got '$masking'" ;; esac
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

step "Extracting Wikipedia articles into $SOURCE/en"
EXTRACTED=$WD/wikipedia/.extracted  # written only after extraction finished
if [ -f "$EXTRACTED" ]; then
  echo "$SOURCE/en is complete ($EXTRACTED present): skipping"
elif [ -n "$(ls -A "$SOURCE/en" 2>/dev/null)" ]; then
  die "$SOURCE/en holds files from an unfinished extraction; delete the folder and run this script again"
else
  "$PYTHON" -m data.extract_wikipedia --input "$DUMP" --output-dir "$SOURCE/en" --num-workers "$num_workers"
  touch "$EXTRACTED"
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

echo
echo "Done. Phase 1: $PHASE1"
echo "      Phase 2: $PHASE2"
echo "      SQuAD:   $WD/download/squad   GLUE: $WD/download/glue   vocab: $VOCAB"
