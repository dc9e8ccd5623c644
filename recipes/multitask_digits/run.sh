#!/usr/bin/env bash
# N-task merging benchmark, offline: one pre-trained digits ViT, fine-tuned on four shifted domains
# (rotate, noise, invert, blur), merged into one model with averaging, task arithmetic, TIES,
# DARE+TIES, Fisher, mask-node Fisher and RegMean, beside each model unmerged and the output ensemble.
#   1 pretrain            plain digits                       -> $OUT_DIR/pretrain/export
#   2 finetune SHIFT      one per domain, from 1             -> $OUT_DIR/SHIFT/export
#   3 fisher SHIFT KIND   full and mask-node Fisher of each  -> $OUT_DIR/fisher/SHIFT.KIND.safetensors
#   3b gram SHIFT         Gram matrices of each (RegMean)    -> $OUT_DIR/gram/SHIFT.safetensors
#   4 merge               every method, held-out table       -> $OUT_DIR/merge/{results.csv,tasks.png}
# Environment: OUT_DIR (default outputs/multitask_digits), FORCE=1 re-runs finished stages,
# EXTRA_ARGS / FISHER_ARGS / MERGE_ARGS go to the training / Fisher / merge stages.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
OUT_DIR=${OUT_DIR:-outputs/multitask_digits}
HERE=recipes/multitask_digits
BASE=(--config configs/data/digits.yaml --config configs/model/vit_tiny_digits.yaml)
SHIFTS=(rotate noise invert blur)

if ! done_already "$OUT_DIR/pretrain/export/lightning_merge.json" pretrain; then
  lightning-merge fit "${BASE[@]}" --config recipes/quickstart/pretrain.yaml \
    --trainer.default_root_dir "$OUT_DIR/pretrain" --trainer.enable_model_summary false \
    --model.init_args.export_dir "$OUT_DIR/pretrain/export" ${EXTRA_ARGS:-}
fi
for shift in "${SHIFTS[@]}"; do
  done_already "$OUT_DIR/$shift/export/lightning_merge.json" "finetune $shift" && continue
  lightning-merge fit "${BASE[@]}" --config "$HERE/finetune.yaml" --data.init_args.train_shift "$shift" \
    --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/pretrain/export" \
    --model.init_args.export_dir "$OUT_DIR/$shift/export" --trainer.default_root_dir "$OUT_DIR/$shift" \
    ${EXTRA_ARGS:-}
done
for shift in "${SHIFTS[@]}"; do
  for kind in full mask; do
    out="$OUT_DIR/fisher/$shift.$kind.safetensors"
    done_already "$out" "fisher $shift $kind" && continue
    lightning-merge predict --config configs/data/digits.yaml --config recipes/quickstart/fisher.yaml \
      --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/$shift/export" --model.init_args.kind "$kind" \
      --model.init_args.output "$out" --data.init_args.train_shift "$shift" \
      --trainer.default_root_dir "$OUT_DIR/fisher" ${FISHER_ARGS:-}
  done
done
for shift in "${SHIFTS[@]}"; do
  out="$OUT_DIR/gram/$shift.safetensors"
  done_already "$out" "gram $shift" && continue
  lightning-merge predict --config configs/data/digits.yaml --config "$HERE/gram.yaml" \
    --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/$shift/export" --model.init_args.output "$out" \
    --data.init_args.train_shift "$shift" --trainer.default_root_dir "$OUT_DIR/gram" ${FISHER_ARGS:-}
done
if ! done_already "$OUT_DIR/merge/results.json" merge; then
  lightning-merge validate --config "$HERE/merge.yaml" --model.init_args.root_dir "$OUT_DIR" \
    --trainer.default_root_dir "$OUT_DIR/merge" ${MERGE_ARGS:-}
fi
echo "Table: $OUT_DIR/merge/results.csv (per-domain held-out scores: <domain>/heldout_score; normalized_heldout)"
echo "Plot:  $OUT_DIR/merge/tasks.png"
