#!/usr/bin/env bash
# The evidence table of the README (docs/evidence.md): stage 1, stage 2 and its ablations trained on the toy world
# for 3 seeds, scored with the world's exact evaluators. 15.4 minutes on a 2-core CPU (8 models x 3 seeds, two
# training processes); no GPU, no network.
#   bash scripts/evidence.sh [--seeds 0,1,2] [--steps N] [--output_dir DIR] ...   (scripts/evidence.py --help)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# one thread per process: on a busy 2-core machine two torch threads were measured 20x slower than one
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python scripts/evidence.py "$@"
