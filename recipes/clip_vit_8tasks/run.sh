#!/usr/bin/env bash
# CLIP ViT image towers merged across tasks: FusionBench's CLIP ViT-B/32 8-task benchmark (the
# task-arithmetic paper's tasks) with this project's exact Fisher, mask-node Fisher and RegMean.
# VARIANT=hub (default; needs the hub, in practice a GPU):
#   1 statistics  full and mask Fisher, Grams of each of FusionBench's towers -> $OUT_DIR/{fisher,gram}/
#   2 merge       every method, per-task held-out table                         -> $OUT_DIR/results.csv, tasks.png
# VARIANT=offline (this machine, CI): a tiny CLIP tower built from a config, pre-trained on digits,
# fine-tuned on four shifted domains (rotate, noise, invert, blur), then the same statistics and merge
# (the multitask_digits merge stage, whose models are read by their export's family).
# Environment: VARIANT, TASKS (hub: the 8 task names), OUT_DIR, FISHER_EXAMPLES (4096), GRAM_EXAMPLES (1000),
# FORCE=1, EXTRA_ARGS (training stages), FISHER_ARGS (statistics stages), MERGE_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
VARIANT=${VARIANT:-hub}
HERE=recipes/clip_vit_8tasks
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
GRAM_EXAMPLES=${GRAM_EXAMPLES:-1000}

statistics() {  # statistics NAME TOWER [ARGS…]: full and mask Fisher, Grams -> $OUT_DIR/{fisher,gram}/NAME.*
  local name=$1 tower=$2; shift 2
  for kind in full mask; do
    done_already "$OUT_DIR/fisher/$name.$kind.safetensors" "$kind Fisher of $name" && continue
    lightning-merge predict --config "$HERE/fisher.yaml" --model.init_args.backbone.init_args.name_or_path "$tower" \
      --model.init_args.kind "$kind" --model.init_args.output "$OUT_DIR/fisher/$name.$kind.safetensors" \
      --data.init_args.max_predict_examples "$FISHER_EXAMPLES" --trainer.default_root_dir "$OUT_DIR/fisher" \
      "$@" ${FISHER_ARGS:-}
  done
  done_already "$OUT_DIR/gram/$name.safetensors" "Grams of $name" && return
  lightning-merge predict --config "$HERE/gram.yaml" --model.init_args.backbone.init_args.name_or_path "$tower" \
    --model.init_args.output "$OUT_DIR/gram/$name.safetensors" --data.init_args.max_predict_examples "$GRAM_EXAMPLES" \
    --trainer.default_root_dir "$OUT_DIR/gram" "$@" ${FISHER_ARGS:-}
}

if [[ "$VARIANT" == offline ]]; then
  OUT_DIR=${OUT_DIR:-outputs/clip_vit_8tasks_offline}
  DIGITS=(--config configs/data/digits.yaml --config configs/model/clip_tiny_digits.yaml)
  if ! done_already "$OUT_DIR/pretrain/export/lightning_merge.json" "pretrain the tiny CLIP tower on digits"; then
    lightning-merge fit "${DIGITS[@]}" --config recipes/quickstart/pretrain.yaml \
      --trainer.default_root_dir "$OUT_DIR/pretrain" --model.init_args.export_dir "$OUT_DIR/pretrain/export" \
      ${EXTRA_ARGS:-}
  fi
  for shift in rotate noise invert blur; do
    if ! done_already "$OUT_DIR/$shift/export/lightning_merge.json" "fine-tune on $shift"; then
      lightning-merge fit "${DIGITS[@]}" --config "$HERE/finetune_offline.yaml" --data.init_args.train_shift "$shift" \
        --model.init_args.backbone.init_args.name_or_path "$OUT_DIR/pretrain/export" \
        --model.init_args.export_dir "$OUT_DIR/$shift/export" --trainer.default_root_dir "$OUT_DIR/$shift" \
        ${EXTRA_ARGS:-}
    fi
    statistics "$shift" "$OUT_DIR/$shift/export" --model.init_args.backbone.init_args.clip null \
      --data.init_args.source digits --data.init_args.train_shift "$shift"
  done
  if ! done_already "$OUT_DIR/merge/results.json" "merge the four towers"; then
    lightning-merge validate --config recipes/multitask_digits/merge.yaml --model.init_args.root_dir "$OUT_DIR" \
      --trainer.default_root_dir "$OUT_DIR/merge" ${MERGE_ARGS:-}
  fi
  cat "$OUT_DIR/merge/results.csv"
  exit 0
fi

OUT_DIR=${OUT_DIR:-outputs/clip_vit_8tasks}
TASKS=${TASKS:-sun397 stanford-cars resisc45 eurosat svhn gtsrb mnist dtd}
for task in $TASKS; do
  case $task in  # the hub data set of each task (FusionBench's copies; SVHN's cropped digits)
    svhn) data=(--data.init_args.source ufldl-stanford/svhn --data.init_args.hub_config cropped_digits) ;;
    mnist) data=(--data.init_args.source ylecun/mnist) ;;
    stanford-cars) data=(--data.init_args.source tanganke/stanford_cars) ;;
    *) data=(--data.init_args.source "tanganke/$task") ;;
  esac
  statistics "$task" "tanganke/clip-vit-base-patch32_$task" "${data[@]}"
done
if ! done_already "$OUT_DIR/results.json" "merge the CLIP towers of: $TASKS"; then
  lightning-merge validate --config "$HERE/merge.yaml" --model.init_args.root_dir "$OUT_DIR" \
    --trainer.default_root_dir "$OUT_DIR" ${MERGE_ARGS:-}
fi
cat "$OUT_DIR/results.csv"
