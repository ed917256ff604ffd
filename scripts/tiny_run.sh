#!/usr/bin/env bash
# The whole PureCC pipeline in about a minute on a laptop CPU: set up .venv, build a tiny random-weight SD3.5 model,
# train stage 1 and stage 2 on data/robot_toy.csv with tiny settings, render samples (noise: the weights are random;
# this checks the plumbing, not image quality). Any setting of run_concept.sh can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export PYTHON=${PYTHON:-.venv/bin/python}
export MODEL_NAME=${MODEL_NAME:-tiny_models/sd35}
if [ ! -f "$MODEL_NAME/model_index.json" ]; then
  echo "[tiny_run] building the tiny SD3.5 model in $MODEL_NAME"
  "$PYTHON" -m utils.tiny_sd3 "$MODEL_NAME" --variant sd35
fi

export OUTPUT_DIR=${OUTPUT_DIR:-./output/tiny}
export RESOLUTION=${RESOLUTION:-64} STAGE1_STEPS=${STAGE1_STEPS:-20} STAGE2_STEPS=${STAGE2_STEPS:-20}
export GRAD_ACCUM=${GRAD_ACCUM:-1} INFER_STEPS=${INFER_STEPS:-4} FORCE=${FORCE:-1}
start=$SECONDS
bash scripts/run_concept.sh data/robot_toy.csv "$@"
echo "[tiny_run] finished in $((SECONDS - start)) s. Images: $OUTPUT_DIR/robot_toy/samples/ (grid.png, compare_*.png);"
echo "[tiny_run] LoRAs: $OUTPUT_DIR/base_ckpt/robot_toy/ (stage 1) and $OUTPUT_DIR/robot_toy/ (stage 2)"
