#!/usr/bin/env bash
# FusionBench's GPT-2 benchmark (7 GLUE tasks) with this project's exact Fisher and RegMean: needs the
# hub (tanganke/gpt2_<task> checkpoints, gpt2, nyu-mll/glue) and, in practice, a GPU.
#   1 statistics  Fisher and Grams of each checkpoint on its training set -> $OUT_DIR/{fisher,gram}/<task>.safetensors
#   2 merge       averaging, Fisher, RegMean, task arithmetic, TIES        -> $OUT_DIR/results.csv, tasks.png
# Environment (defaults): TASKS ("cola mnli mrpc qnli qqp rte sst2"), FISHER_EXAMPLES (4096), GRAM_EXAMPLES
# (1000), OUT_DIR (outputs/gpt2_glue), FORCE=1, EXTRA_ARGS (every stage).
set -euo pipefail
cd "$(dirname "$0")/../.."
source recipes/lib.sh
TASKS=${TASKS:-cola mnli mrpc qnli qqp rte sst2}
FISHER_EXAMPLES=${FISHER_EXAMPLES:-4096}
GRAM_EXAMPLES=${GRAM_EXAMPLES:-1000}
OUT_DIR=${OUT_DIR:-outputs/gpt2_glue}
FORCE=${FORCE:-0}
HERE=recipes/gpt2_glue

for task in $TASKS; do
  if ! done_already "$OUT_DIR/fisher/$task.safetensors" "Fisher of tanganke/gpt2_$task"; then
    lightning-merge predict --config configs/data/glue.yaml --config "$HERE/fisher.yaml" \
      --model.init_args.backbone.init_args.name_or_path "tanganke/gpt2_$task" \
      --model.init_args.output "$OUT_DIR/fisher/$task.safetensors" --data.init_args.task "$task" \
      --data.init_args.max_predict_examples "$FISHER_EXAMPLES" --trainer.default_root_dir "$OUT_DIR/fisher" ${EXTRA_ARGS:-}
  fi
  if ! done_already "$OUT_DIR/gram/$task.safetensors" "Grams of tanganke/gpt2_$task"; then
    lightning-merge predict --config configs/data/glue.yaml --config "$HERE/gram.yaml" \
      --model.init_args.backbone.init_args.name_or_path "tanganke/gpt2_$task" \
      --model.init_args.output "$OUT_DIR/gram/$task.safetensors" --data.init_args.task "$task" \
      --data.init_args.max_predict_examples "$GRAM_EXAMPLES" --trainer.default_root_dir "$OUT_DIR/gram" ${EXTRA_ARGS:-}
  fi
done
if ! done_already "$OUT_DIR/results.json" "merge the GPT-2 models of: $TASKS"; then
  lightning-merge validate --config "$HERE/merge.yaml" --model.init_args.root_dir "$OUT_DIR" \
    --trainer.default_root_dir "$OUT_DIR" ${EXTRA_ARGS:-}
fi
cat "$OUT_DIR/results.csv"
