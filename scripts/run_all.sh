#!/usr/bin/env bash
# Run scripts/run_concept.sh for every data/*.csv, or for the CSVs given as arguments. A failed concept does not stop
# the others; a summary table (concept, stage, status, time, output folder) ends the run, and the exit status is
# non-zero if any concept failed. Settings: see run_concept.sh (environment variables, e.g.
# MODEL_NAME=/path/to/SD3.5-medium bash scripts/run_all.sh).
#
#   bash scripts/run_all.sh [--gpus 0,1,2,3] [CONCEPT.csv ...]
#
# --gpus: one concept per GPU at a time, in parallel (CUDA_VISIBLE_DEVICES=<id> for each), the next concept starting
# on whichever GPU frees first. Each concept's output then goes to $OUTPUT_DIR/logs/<concept>.log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "error: $*" >&2; exit 2; }

gpus=()
csvs=()
while [ $# -gt 0 ]; do
  case "$1" in
    --gpus) [ $# -ge 2 ] || die "--gpus needs a comma-separated list of GPU ids, e.g. --gpus 0,1,2,3"
            IFS=, read -r -a gpus <<< "$2"; shift 2 ;;
    --gpus=*) IFS=, read -r -a gpus <<< "${1#--gpus=}"; shift ;;
    *) csvs+=("$1"); shift ;;
  esac
done
if [ ${#csvs[@]} -eq 0 ]; then
  shopt -s nullglob
  csvs=("$REPO"/data/*.csv)
  shopt -u nullglob
  [ ${#csvs[@]} -gt 0 ] || die "no concept CSVs in $REPO/data/ (or pass CSV paths as arguments)"
fi
OUT=${OUTPUT_DIR:-./output}
LOGS=$OUT/logs
mkdir -p "$LOGS"

# run_one CSV GPU: one concept; its status line ("concept<TAB>stage<TAB>status<TAB>seconds<TAB>folder") goes to
# $LOGS/<concept>.status
run_one() {
  local csv=$1 gpu=$2 concept log start status stage
  concept=$(basename "$csv" .csv)
  log=$LOGS/$concept.log
  start=$SECONDS
  if [ -n "$gpu" ]; then
    CUDA_VISIBLE_DEVICES=$gpu bash "$REPO/scripts/run_concept.sh" "$csv" > "$log" 2>&1 && status=ok || status="FAILED ($?)"
  else
    bash "$REPO/scripts/run_concept.sh" "$csv" 2>&1 | tee "$log" && status=ok || status="FAILED (${PIPESTATUS[0]})"
  fi
  # the last stage run_concept.sh announced: where a failure happened, or "done"
  stage=$(grep -o '^\[run_concept\] \(stage [12]\|samples\|done\)' "$log" | tail -n 1 | sed 's/^\[run_concept\] //' \
          || true)
  printf '%s\t%s\t%s\t%s\t%s\n' "$concept" "${stage:-inputs}" "$status" "$((SECONDS - start))" \
    "$OUT/$concept" > "$LOGS/$concept.status"
}

if [ ${#gpus[@]} -eq 0 ]; then
  for csv in "${csvs[@]}"; do
    echo "[run_all] === $csv"
    run_one "$csv" ""
  done
else
  echo "[run_all] ${#csvs[@]} concept(s) on GPU(s) ${gpus[*]}; logs in $LOGS/"
  declare -A busy=()  # pid -> gpu
  next=0
  while [ $next -lt ${#csvs[@]} ] || [ ${#busy[@]} -gt 0 ]; do
    for gpu in "${gpus[@]}"; do  # fill every free GPU
      [ $next -lt ${#csvs[@]} ] || break
      if ! printf '%s\n' "${busy[@]+"${busy[@]}"}" | grep -qx "$gpu"; then
        echo "[run_all] GPU $gpu: ${csvs[$next]}"
        run_one "${csvs[$next]}" "$gpu" &
        busy[$!]=$gpu
        next=$((next + 1))
      fi
    done
    wait -n || true
    for pid in "${!busy[@]}"; do kill -0 "$pid" 2>/dev/null || unset "busy[$pid]"; done
  done
fi

failed=0
echo "[run_all] summary"
printf '%-24s %-8s %-12s %8s  %s\n' concept stage status time output
for csv in "${csvs[@]}"; do
  concept=$(basename "$csv" .csv)
  if [ -f "$LOGS/$concept.status" ]; then
    IFS=$'\t' read -r name stage status seconds folder < "$LOGS/$concept.status"
  else
    name=$concept stage=inputs status="FAILED (no status)" seconds=0 folder="$OUT/$concept"
  fi
  [ "$status" = ok ] || failed=$((failed + 1))
  printf '%-24s %-8s %-12s %7ss  %s\n' "$name" "$stage" "$status" "$seconds" "$folder"
done
if [ $failed -gt 0 ]; then
  echo "[run_all] $failed of ${#csvs[@]} concept(s) failed (logs in $LOGS/)" >&2
  exit 1
fi
echo "[run_all] all ${#csvs[@]} concept(s) done"
