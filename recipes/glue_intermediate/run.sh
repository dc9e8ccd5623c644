#!/usr/bin/env bash
# Intermediate-task merging with BERT-base (NeurIPS paper §3.3 / arXiv §3.1.1), models and GLUE from
# the hub: fine-tune the target, take the donor from the hub (or fine-tune it), Fisher of both on
# 4096 training examples, 50-point λ grid, Fisher vs isotropic vs unmerged.
#   1 target  fine-tune bert-base-uncased on TARGET_TASK  -> $OUT_DIR/target/export
#   2 donor   the hub donor named in merge.yaml (DONOR=hub), or fine-tuned on DONOR_TASK (DONOR=finetune)
#   3 fisher  exact Fisher of both                        -> $OUT_DIR/fisher/{target,donor}.safetensors
#   4 merge                                               -> $OUT_DIR/results.csv, score_vs_lambda.png
# Environment (defaults): TARGET_TASK (RTE), DONOR_TASK (MNLI), DONOR (hub: textattack/bert-base-uncased-MNLI,
# as merge.yaml names it; finetune: fine-tune bert-base-uncased on DONOR_TASK), OUT_DIR (outputs/glue_intermediate), DATA_DIR (empty: hub),
# FISHER_EXAMPLES (4096), GRID_POINTS (50), FORCE=1, EXTRA_ARGS (every stage, e.g.
# "--trainer.devices 4 --trainer.strategy ddp").
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TARGET_TASK=${TARGET_TASK:-RTE}
DONOR_TASK=${DONOR_TASK:-MNLI}
DONOR=${DONOR:-hub}
HUB_DONOR=textattack/bert-base-uncased-MNLI  # the donor merge.yaml names
OUT_DIR=${OUT_DIR:-outputs/glue_intermediate}
DATA_DIR=${DATA_DIR:-null}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
GRID_POINTS=${GRID_POINTS:-50}
FORCE=${FORCE:-0}
HERE=recipes/glue_intermediate

finetune() {  # finetune ROLE TASK
  done_already "$OUT_DIR/$1/export/lightning_merge.json" "fine-tune $1 ($2)" && return
  lightning-merge fit --config configs/trainer/default.yaml --config configs/model/bert_base.yaml \
    --config configs/data/glue.yaml --config "$HERE/finetune.yaml" \
    --data.init_args.task "$2" --data.init_args.data_dir "$DATA_DIR" \
    --model.init_args.backbone.init_args.reinit_head true \
    --trainer.default_root_dir "$OUT_DIR/$1" --model.init_args.export_dir "$OUT_DIR/$1/export" ${EXTRA_ARGS:-}
}
fisher() {  # fisher ROLE MODEL TASK
  done_already "$OUT_DIR/fisher/$1.safetensors" "fisher $1 ($3)" && return
  lightning-merge predict --config configs/data/glue.yaml --config configs/fisher/exact.yaml \
    --model.init_args.backbone.init_args.name_or_path "$2" --model.init_args.output "$OUT_DIR/fisher/$1.safetensors" \
    --data.init_args.task "$3" --data.init_args.data_dir "$DATA_DIR" \
    --data.init_args.max_predict_examples "$FISHER_EXAMPLES" --trainer.default_root_dir "$OUT_DIR/fisher" ${EXTRA_ARGS:-}
}

finetune target "$TARGET_TASK"
merge_configs=(--config "$HERE/merge.yaml")
if [[ "$DONOR" == finetune ]]; then
  finetune donor "$DONOR_TASK"
  fisher donor "$OUT_DIR/donor/export" "$DONOR_TASK"
  merge_configs+=(--config "$HERE/donor_finetuned.yaml")
else
  fisher donor "$HUB_DONOR" "$DONOR_TASK"
fi
fisher target "$OUT_DIR/target/export" "$TARGET_TASK"
if ! done_already "$OUT_DIR/results.json" "merge $TARGET_TASK ← $DONOR_TASK"; then
  lightning-merge validate "${merge_configs[@]}" --model.init_args.root_dir "$OUT_DIR" --trainer.default_root_dir "$OUT_DIR" \
    --model.init_args.data.init_args.task "$TARGET_TASK" --model.init_args.data.init_args.data_dir "$DATA_DIR" \
    --model.init_args.search.init_args.points "$GRID_POINTS" ${EXTRA_ARGS:-}
fi
cat "$OUT_DIR/results.csv"
