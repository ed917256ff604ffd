#!/usr/bin/env bash
# Run scripts/run_concept.sh for every data/*.csv, or for the CSVs given as arguments. A failed concept does not stop
# the others; the failures are listed at the end and the exit status is non-zero. Settings: see run_concept.sh
# (environment variables, e.g. MODEL_NAME=/path/to/SD3.5-medium bash scripts/run_all.sh).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ $# -gt 0 ]; then
  csvs=("$@")
else
  shopt -s nullglob
  csvs=("$REPO"/data/*.csv)
  shopt -u nullglob
  [ ${#csvs[@]} -gt 0 ] || { echo "error: no concept CSVs in $REPO/data/ (or pass CSV paths as arguments)" >&2; exit 2; }
fi

failed=()
for csv in "${csvs[@]}"; do
  echo "[run_all] === $csv"
  if ! bash "$REPO/scripts/run_concept.sh" "$csv"; then
    echo "[run_all] FAILED: $csv" >&2
    failed+=("$csv")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "[run_all] ${#failed[@]} of ${#csvs[@]} concept(s) failed:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "[run_all] all ${#csvs[@]} concept(s) done"
