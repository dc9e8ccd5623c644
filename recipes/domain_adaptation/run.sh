#!/usr/bin/env bash
# Domain adaptation by merging (NeurIPS paper §3.4, table 1): a classifier fine-tuned from RoBERTa-base
# on a domain task is merged with the domain-adaptively pre-trained (DAPT) masked LM of that domain.
#   1 classifier  fine-tune BASE_MODEL on TASK                    -> $OUT_DIR/classifier/export
#   2 fisher      exact Fisher of the classifier on TASK          -> $OUT_DIR/fisher/classifier.safetensors
#   3 mlm_fisher  sampled masked-token Fisher of DAPT_MODEL       -> $OUT_DIR/fisher/dapt.safetensors
#   4 merge       λ grid, Fisher vs isotropic vs unmerged         -> $OUT_DIR/results.csv, score_vs_lambda.png
# Environment (defaults): TASK (chemprot; acl_arc, scierc), DATA_DIR (data/dapt: chemprot/,
# citation_intent/, sciie/ with {train,dev,test}.jsonl from Gururangan et al.), BASE_MODEL (roberta-base),
# DAPT_MODEL (allenai/biomed_roberta_base; allenai/cs_roberta_base for acl_arc / scierc), DOMAIN_TEXT
# (the task's train.jsonl), FISHER_EXAMPLES (4096), GRID_POINTS (50), OUT_DIR, FORCE=1, EXTRA_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TASK=${TASK:-chemprot}
DATA_DIR=${DATA_DIR:-data/dapt}
BASE_MODEL=${BASE_MODEL:-roberta-base}
DAPT_MODEL=${DAPT_MODEL:-allenai/biomed_roberta_base}
FOLDER=$(python -c "import sys; from lightning_merge.data import get_glue_task; print(get_glue_task(sys.argv[1]).local_dir)" "$TASK")
DOMAIN_TEXT=${DOMAIN_TEXT:-$DATA_DIR/$FOLDER/train.jsonl}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
GRID_POINTS=${GRID_POINTS:-50}
OUT_DIR=${OUT_DIR:-outputs/domain_adaptation}
HERE=recipes/domain_adaptation
DATA=(--data.init_args.task "$TASK" --data.init_args.data_dir "$DATA_DIR")

if ! done_already "$OUT_DIR/classifier/export/lightning_merge.json" "fine-tune $BASE_MODEL on $TASK"; then
  lightning-merge fit --config configs/trainer/default.yaml --config "$HERE/finetune.yaml" "${DATA[@]}" \
    --model.init_args.backbone.init_args.name_or_path "$BASE_MODEL" \
    --trainer.default_root_dir "$OUT_DIR/classifier" --model.init_args.export_dir "$OUT_DIR/classifier/export" \
    ${EXTRA_ARGS:-}
fi
if ! done_already "$OUT_DIR/fisher/classifier.safetensors" "fisher classifier"; then
  lightning-merge predict --data lightning_merge.data.GlueDataModule "${DATA[@]}" --data.init_args.max_length 256 \
    --config configs/fisher/exact.yaml \
    --model.init_args.backbone.init_args.name_or_path "$OUT_DIR/classifier/export" \
    --model.init_args.output "$OUT_DIR/fisher/classifier.safetensors" \
    --data.init_args.max_predict_examples "$FISHER_EXAMPLES" --trainer.default_root_dir "$OUT_DIR/fisher" ${EXTRA_ARGS:-}
fi
if ! done_already "$OUT_DIR/fisher/dapt.safetensors" "fisher $DAPT_MODEL (masked tokens of $DOMAIN_TEXT)"; then
  lightning-merge predict --config "$HERE/mlm_fisher.yaml" \
    --model.init_args.backbone.init_args.name_or_path "$DAPT_MODEL" --model.init_args.output "$OUT_DIR/fisher/dapt.safetensors" \
    --data.init_args.source "$DOMAIN_TEXT" --data.init_args.max_predict_examples "$FISHER_EXAMPLES" \
    --trainer.default_root_dir "$OUT_DIR/fisher" ${EXTRA_ARGS:-}
fi
if ! done_already "$OUT_DIR/results.json" "merge"; then
  listed=()  # merge.yaml names allenai/biomed_roberta_base; another DAPT_MODEL is listed here instead
  [[ "$DAPT_MODEL" != allenai/biomed_roberta_base ]] && listed=(--model.init_args.models "[]"
    --model.init_args.models+ "{path: classifier/export, fisher: fisher/classifier.safetensors}"
    --model.init_args.models+ "{path: $DAPT_MODEL, fisher: fisher/dapt.safetensors, family: hf_mlm, allow_missing: true}")
  lightning-merge validate --config "$HERE/merge.yaml" --model.init_args.root_dir "$OUT_DIR" --trainer.default_root_dir "$OUT_DIR" \
    "${listed[@]}" --model.init_args.data.init_args.task "$TASK" --model.init_args.data.init_args.data_dir "$(realpath "$DATA_DIR")" \
    --model.init_args.search.init_args.points "$GRID_POINTS" ${EXTRA_ARGS:-}
fi
cat "$OUT_DIR/results.csv"
