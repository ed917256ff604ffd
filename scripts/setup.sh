#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned requirements. A second run with everything installed
# takes seconds: the install is skipped while requirements.txt is unchanged since the last success.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into .venv"
  # Some machines' pip config names local index folders that do not exist: drop only those warnings.
  set +e +o pipefail
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory"
  pip_status=${PIPESTATUS[0]}
  set -e -o pipefail
  [ "$pip_status" = 0 ] || { echo "[setup] pip install -r requirements.txt failed (exit $pip_status)" >&2; exit 1; }
  .venv/bin/python -c "import torch, diffusers, transformers, peft, accelerate, bitsandbytes, pandas, PIL" \
    || { echo "[setup] install failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi
