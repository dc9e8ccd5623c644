#!/usr/bin/env bash
# WiSE-FT with a timm ViT (NeurIPS paper §3.2, fig. 3): interpolate a fine-tuned ViT with its
# "zero-shot" start, isotropically (WiSE-FT) and Fisher-weighted, and compare IID vs OOD accuracy per λ.
#   0 pretrain      offline variant only: a small ViT "pre-trained" on plain digits
#   1 linear_probe  new head on the frozen pre-trained body        -> $OUT_DIR/linear_probe/export
#   2 finetune      everything, from 1                             -> $OUT_DIR/finetune/export
#   3 fisher        exact Fisher of 1 and 2                        -> $OUT_DIR/fisher/*.safetensors
#   4 wise_ft       λ = 0..1 step 0.1, IID and OOD sets             -> $OUT_DIR/results.csv, iid_vs_ood.png
# Environment (defaults): VARIANT (hub: vit_base_patch16_224 + CIFAR-10 from the hub; offline: the small
# digits ViT, no download), OUT_DIR (outputs/wise_ft_vit[_offline]), FISHER_EXAMPLES (4096), FORCE=1,
# EXTRA_ARGS (every stage; e.g. "--trainer.devices 4 --trainer.strategy ddp").
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
VARIANT=${VARIANT:-hub}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
FORCE=${FORCE:-0}
HERE=recipes/wise_ft_vit
if [[ "$VARIANT" == offline ]]; then
  OUT_DIR=${OUT_DIR:-outputs/wise_ft_vit_offline}
  DATA=(--config configs/data/digits.yaml --data.init_args.train_shift rotate
        --data.init_args.eval_shifts "[original, noise, blur]")
  MERGE=(--config "$HERE/wise_ft.yaml" --config "$HERE/wise_ft_offline.yaml")
  START="$OUT_DIR/pretrain/export"
  TRAIN_SHIFT=rotate
else
  OUT_DIR=${OUT_DIR:-outputs/wise_ft_vit}
  DATA=(--config configs/data/cifar10_hub.yaml)
  MERGE=(--config "$HERE/wise_ft.yaml")
  START=""
  TRAIN_SHIFT=none
fi


if [[ "$VARIANT" == offline ]] && ! done_already "$START/lightning_merge.json" pretrain; then
  lightning-merge fit --config configs/data/digits.yaml --config configs/model/vit_tiny_digits.yaml \
    --config recipes/quickstart/pretrain.yaml --trainer.default_root_dir "$OUT_DIR/pretrain" \
    --model.init_args.export_dir "$START" ${EXTRA_ARGS:-}
fi
if ! done_already "$OUT_DIR/linear_probe/export/lightning_merge.json" linear_probe; then
  model=(--config configs/model/vit_base_hub.yaml)
  [[ -n "$START" ]] && model=(--config configs/model/vit_tiny_digits.yaml
                             --model.init_args.backbone.init_args.checkpoint "$START")
  lightning-merge fit "${DATA[@]}" "${model[@]}" --config "$HERE/linear_probe.yaml" \
    --trainer.default_root_dir "$OUT_DIR/linear_probe" --model.init_args.export_dir "$OUT_DIR/linear_probe/export" \
    ${EXTRA_ARGS:-}
fi
if ! done_already "$OUT_DIR/finetune/export/lightning_merge.json" finetune; then
  lightning-merge fit "${DATA[@]}" --config configs/model/vit_base_hub.yaml --config "$HERE/finetune.yaml" \
    --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/linear_probe/export" \
    --trainer.default_root_dir "$OUT_DIR/finetune" --model.init_args.export_dir "$OUT_DIR/finetune/export" \
    ${EXTRA_ARGS:-}
fi
for model in linear_probe finetune; do
  done_already "$OUT_DIR/fisher/$model.safetensors" "fisher $model" && continue
  lightning-merge predict "${DATA[@]}" --config recipes/quickstart/fisher.yaml \
    --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/$model/export" \
    --model.init_args.output "$OUT_DIR/fisher/$model.safetensors" \
    --data.init_args.max_predict_examples "$FISHER_EXAMPLES" --data.init_args.train_shift "$TRAIN_SHIFT" \
    --trainer.default_root_dir "$OUT_DIR/fisher" ${EXTRA_ARGS:-}
done
if ! done_already "$OUT_DIR/results.json" wise_ft; then
  lightning-merge validate "${MERGE[@]}" --model.init_args.root_dir "$OUT_DIR" --trainer.default_root_dir "$OUT_DIR" \
    ${EXTRA_ARGS:-}
fi
cat "$OUT_DIR/results.csv"
