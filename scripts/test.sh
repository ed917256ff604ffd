#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# two workers on a 2-core machine, one torch thread each (two threads per process were measured 20x slower when the
# cores are busy); tests that share the session's run_concept.sh run stay on one worker (--dist loadgroup)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadgroup tests "$@"
