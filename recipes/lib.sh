# Shell helpers every recipe's run.sh sources (after `cd` to the repository root).

# done_already FILE LABEL: announce a stage; true (skip it) when FILE exists and FORCE is not 1.
done_already() {
  if [[ -f "$1" && "${FORCE:-0}" != 1 ]]; then echo "== $2: already done ($1), FORCE=1 to redo"; return 0; fi
  echo "== $2"; return 1
}
