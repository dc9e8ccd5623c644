#!/usr/bin/env bash
# Merging as an alternative to ensembling (NeurIPS paper §3.1, fig. 2): M checkpoints of one task,
# merged with λ = 1/M (isotropic and Fisher), against their output ensemble and the models alone.
#   1 finetune  one model per seed in SEEDS (skipped when MODELS lists checkpoints) -> $OUT_DIR/seed*/export
#   2 fisher    Fisher of each, full and mask-node                                -> $OUT_DIR/fisher/model*.{full,mask}.safetensors
#   3 merge                                                                       -> $OUT_DIR/results.csv
# Environment (defaults): TASK (RTE), SEEDS ("1 2 3 4 5"), MODELS (space-separated hub ids or export
# folders; fine-tunes nothing when set), MODEL_CONFIG (configs/model/minilm.yaml; configs/model/bert_base.yaml
# for the paper), DATA_DIR (../shared/data/glue; "null" for the hub), EPOCHS (3), MAX_TRAIN_EXAMPLES
# (all), FISHER_EXAMPLES (4096; RTE's train set has 2490), FISHER_VARIANT (auto: exact up to 16 labels),
# OUT_DIR (outputs/ensembling), FORCE=1, EXTRA_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TASK=${TASK:-RTE}
SEEDS=${SEEDS:-1 2 3 4 5}
MODELS=${MODELS:-}
MODEL_CONFIG=${MODEL_CONFIG:-configs/model/minilm.yaml}
DATA_DIR=${DATA_DIR:-../shared/data/glue}
EPOCHS=${EPOCHS:-3}
MAX_TRAIN_EXAMPLES=${MAX_TRAIN_EXAMPLES:-null}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
FISHER_VARIANT=${FISHER_VARIANT:-auto}
OUT_DIR=${OUT_DIR:-outputs/ensembling}
FORCE=${FORCE:-0}

paths=()
if [[ -n "$MODELS" ]]; then
  read -r -a paths <<< "$MODELS"
else
  for seed in $SEEDS; do
    paths+=("$OUT_DIR/seed$seed/export")
    done_already "$OUT_DIR/seed$seed/export/lightning_merge.json" "fine-tune seed $seed" && continue
    lightning-merge fit --config "$MODEL_CONFIG" --config configs/data/glue.yaml \
      --config recipes/glue_intermediate_minilm/finetune.yaml --seed_everything "$seed" \
      --data.init_args.task "$TASK" --data.init_args.data_dir "$DATA_DIR" \
      --data.init_args.max_train_examples "$MAX_TRAIN_EXAMPLES" --data.init_args.seed "$seed" \
      --trainer.max_epochs "$EPOCHS" \
      --trainer.default_root_dir "$OUT_DIR/seed$seed" --model.init_args.export_dir "$OUT_DIR/seed$seed/export" \
      ${EXTRA_ARGS:-}
  done
fi

listed=()  # merge.yaml lists the five default seeds; other SEEDS or MODELS are listed here instead
[[ -n "$MODELS" || "$SEEDS" != "1 2 3 4 5" ]] && listed=(--model.init_args.models "[]")
for i in "${!paths[@]}"; do
  for kind in full mask; do
    out="$OUT_DIR/fisher/model$i.$kind.safetensors"
    done_already "$out" "$kind Fisher of model $i (${paths[$i]})" && continue
    lightning-merge predict --config configs/data/glue.yaml --config configs/fisher/exact.yaml \
      --model.init_args.backbone.init_args.name_or_path "${paths[$i]}" --model.init_args.output "$out" \
      --model.init_args.kind "$kind" --model.init_args.variant "$FISHER_VARIANT" \
      --data.init_args.task "$TASK" --data.init_args.data_dir "$DATA_DIR" \
      --data.init_args.max_predict_examples "$FISHER_EXAMPLES" --trainer.default_root_dir "$OUT_DIR/fisher" \
      ${EXTRA_ARGS:-}
  done
  path=${paths[$i]}; [[ -e "$path" ]] && path=$(realpath "$path")
  [[ ${#listed[@]} -gt 0 ]] && listed+=(--model.init_args.models+
    "{path: $path, fisher: fisher/model$i.full.safetensors, mask_fisher: fisher/model$i.mask.safetensors}")
done
if ! done_already "$OUT_DIR/results.json" "merge ${#paths[@]} models, λ = 1/${#paths[@]}"; then
  lightning-merge validate --config recipes/ensembling/merge.yaml --model.init_args.root_dir "$OUT_DIR" \
    --trainer.default_root_dir "$OUT_DIR" "${listed[@]}" \
    --model.init_args.data.init_args.task "$TASK" --model.init_args.data.init_args.data_dir "$DATA_DIR" ${EXTRA_ARGS:-}
fi
cat "$OUT_DIR/results.csv"
