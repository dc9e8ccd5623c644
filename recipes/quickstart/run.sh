#!/usr/bin/env bash
# Offline quickstart: a small ViT on scikit-learn's digits, on 2 CPU cores in a few minutes.
#   stage 1  pretrain          plain digits                     -> $OUT_DIR/pretrain/export
#   stage 2  finetune_shifted  rotated digits, L2-to-pretrained -> $OUT_DIR/finetune_shifted/export
#   stage 3  fisher            full and mask-node Fisher of both models -> $OUT_DIR/fisher/*.safetensors
# Environment: OUT_DIR (default outputs/quickstart), FORCE=1 re-runs finished stages,
# EPOCHS_SCALE (e.g. 0.25) shortens every stage, EXTRA_ARGS are passed to every stage.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${OUT_DIR:-outputs/quickstart}
FORCE=${FORCE:-0}
EPOCHS_SCALE=${EPOCHS_SCALE:-1}
BASE=(--config configs/data/digits.yaml --config configs/model/vit_tiny_digits.yaml)

epochs() { python -c "import sys; print(max(1, round($1 * float(sys.argv[1]))))" "$EPOCHS_SCALE"; }

stage() {  # stage NAME EPOCHS [extra args...]
  local name=$1 n=$2; shift 2
  if [[ -f "$OUT_DIR/$name/export/lightning_merge.json" && "$FORCE" != 1 ]]; then
    echo "== $name: already done ($OUT_DIR/$name/export), FORCE=1 to redo"; return
  fi
  echo "== $name"
  lightning-merge fit "${BASE[@]}" --config "recipes/quickstart/$name.yaml" \
    --trainer.max_epochs "$(epochs "$n")" --trainer.default_root_dir "$OUT_DIR/$name" \
    --model.init_args.export_dir "$OUT_DIR/$name/export" "$@" ${EXTRA_ARGS:-}
}

stage pretrain 8
stage finetune_shifted 4 --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/pretrain/export"
fisher() {  # fisher MODEL KIND [extra args...]
  local model=$1 kind=$2; shift 2
  local out="$OUT_DIR/fisher/$model.$kind.safetensors"
  if [[ -f "$out" && "$FORCE" != 1 ]]; then echo "== fisher $model $kind: already done ($out)"; return; fi
  echo "== fisher $model $kind"
  lightning-merge predict --config configs/data/digits.yaml --config recipes/quickstart/fisher.yaml \
    --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/$model/export" \
    --model.init_args.kind "$kind" --model.init_args.output "$out" \
    --trainer.default_root_dir "$OUT_DIR/fisher" "$@" ${FISHER_ARGS:-}
}

for kind in full mask; do
  fisher pretrain "$kind" --data.init_args.train_shift none
  fisher finetune_shifted "$kind"
done
echo "Exports under $OUT_DIR/*/export; metrics under $OUT_DIR/*/lightning_logs"
