#!/usr/bin/env bash
# Offline quickstart: a small ViT on scikit-learn's digits, every stage of the method, on 2 CPU cores
# in about 3 minutes.
#   1 pretrain          plain digits                                  -> $OUT_DIR/pretrain/export
#   2 finetune_shifted  rotated digits (from 1), L2-to-pretrained      -> $OUT_DIR/finetune_shifted/export
#   3 finetune_noise    noisy digits (from 1), a second task           -> $OUT_DIR/finetune_noise/export
#   4 fisher            full and mask-node Fisher of 1, 2, 3           -> $OUT_DIR/fisher/*.safetensors
#   5 wise_ft           2 ↔ 1 for λ = 0..1, IID vs OOD                 -> $OUT_DIR/wise_ft/
#   6 merge             2 + 3: isotropic / Fisher / mask Fisher vs unmerged and ensemble -> $OUT_DIR/merge/
# Environment: OUT_DIR (default outputs/quickstart), FORCE=1 re-runs finished stages, EPOCHS_SCALE
# (e.g. 0.25) shortens training, EXTRA_ARGS go to every training stage, FISHER_ARGS to every Fisher
# stage, MERGE_ARGS to both merge stages (e.g. "--trainer.devices 2 --trainer.strategy ddp").
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
OUT_DIR=${OUT_DIR:-outputs/quickstart}
FORCE=${FORCE:-0}
EPOCHS_SCALE=${EPOCHS_SCALE:-1}
BASE=(--config configs/data/digits.yaml --config configs/model/vit_tiny_digits.yaml)

epochs() { python -c "import sys; print(max(1, round($1 * float(sys.argv[1]))))" "$EPOCHS_SCALE"; }

train() {  # train NAME EPOCHS [extra args...]
  local name=$1 n=$2; shift 2
  done_already "$OUT_DIR/$name/export/lightning_merge.json" "$name" && return
  lightning-merge fit "${BASE[@]}" --config "recipes/quickstart/$name.yaml" \
    --trainer.max_epochs "$(epochs "$n")" --trainer.default_root_dir "$OUT_DIR/$name" \
    --model.init_args.export_dir "$OUT_DIR/$name/export" "$@" ${EXTRA_ARGS:-}
}

fisher() {  # fisher MODEL KIND SHIFT
  local model=$1 kind=$2 shift=$3 out="$OUT_DIR/fisher/$1.$2.safetensors"
  done_already "$out" "fisher $model $kind" && return
  lightning-merge predict --config configs/data/digits.yaml --config recipes/quickstart/fisher.yaml \
    --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/$model/export" \
    --model.init_args.kind "$kind" --model.init_args.output "$out" --data.init_args.train_shift "$shift" \
    --trainer.default_root_dir "$OUT_DIR/fisher" ${FISHER_ARGS:-}
}

merge() {  # merge NAME
  done_already "$OUT_DIR/$1/results.json" "$1" && return
  lightning-merge validate --config "recipes/quickstart/$1.yaml" --model.init_args.root_dir "$OUT_DIR" \
    --trainer.default_root_dir "$OUT_DIR/$1" \
    ${MERGE_ARGS:-}
}

train pretrain 20
train finetune_shifted 4 --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/pretrain/export"
train finetune_noise 6 --model.init_args.backbone.init_args.checkpoint "$OUT_DIR/pretrain/export"
for kind in full mask; do
  fisher pretrain "$kind" none
  fisher finetune_shifted "$kind" rotate
  fisher finetune_noise "$kind" noise
done
merge wise_ft
merge merge
echo
echo "WiSE-FT (rotated digits fine-tune ↔ pre-trained), IID vs OOD per λ: $OUT_DIR/wise_ft/results.csv, iid_vs_ood.png"
echo "Two-task merge (rotated + noisy digits):  $OUT_DIR/merge/results.csv, score_vs_lambda.png"
python - "$OUT_DIR/merge/results.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cols = ["method", "coefficients", "selection_score", "heldout_score", "full_score", "rotated/accuracy", "noisy/accuracy"]
print("  ".join(f"{c:>17}" for c in cols))
for r in rows:
    print("  ".join(f"{(r[c][:6] if c.endswith(('score', 'accuracy')) else r[c]):>17}" for c in cols))
PY
