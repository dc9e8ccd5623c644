# Shell helpers every recipe's run.sh sources (after `cd` to the repository root).

# done_already FILE LABEL: announce a stage; true (skip it) when FILE exists and FORCE is not 1.
done_already() {
  if [[ -f "$1" && "${FORCE:-0}" != 1 ]]; then echo "== $2: already done ($1), FORCE=1 to redo"; return 0; fi
  echo "== $2"; return 1
}

# num_labels TASK: the head size a GLUE task needs (STS-B as 25 buckets, as in the paper).
num_labels() {
  python -c "import sys; from lightning_merge.data.glue_tasks import get_glue_task, num_labels_for
print(num_labels_for(get_glue_task(sys.argv[1]), True))" "$1"
}
