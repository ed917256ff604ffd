#!/usr/bin/env bash
# The GPU figures of the README in one go, on one CUDA GPU, each part bounded so the whole fits one device call:
#   world  scripts/build_toy_world.py on the GPU (the evidence world; packed to $OUT/toy_world.tgz)
#   bench  scripts/bench.py on SD3.5 Medium's real configs (random weights, bf16): stage 1, stage 2 and the
#          authors' design at 512 px; the two stages compiled; both at 1024 px with base / LoRA / fused-LoRA
#          generation
# Logs and JSON go to $OUT/results.tgz (default OUT=./output/gpu_checks).
#   bash scripts/gpu_checks.sh [world,bench]
# Try it on a CPU first with tiny settings:
#   BENCH_MODEL=tiny_sd35 RES1=64 RES2=96 WORLD_FLAGS="--device cpu --vae_steps 5 --transformer_steps 5 \
#     --eval_samples 4 --eval_every 0" bash scripts/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./output/gpu_checks}
WORK=${WORK:-/tmp/purecc-gpu}
PY=${PYTHON:-python3}
LOGS=$WORK/results
mkdir -p "$OUT" "$LOGS"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
parts=${1:-world,bench}
DEADLINE=${DEADLINE:-585}  # seconds for everything; each part gets at most what is left
BENCH_MODEL=${BENCH_MODEL:-sd35m}
WORLD_FLAGS=${WORLD_FLAGS:---device cuda --threads 8 --vae_steps 1500 --vae_batch_size 32 --transformer_steps 8000 \
--batch_size 256 --eval_every 0 --time_budget_s 120}
has() { [[ ",$parts," == *",$1,"* ]]; }
left() { local cap=$1 rest=$((DEADLINE - SECONDS)); echo $((rest < cap ? rest : cap)); }
pack() { tar -czf "$OUT/results.tgz" -C "$WORK" results; }
run() {  # run NAME CAP CMD...: bounded, logged to $LOGS/NAME.log, progress bars dropped
  local name=$1 cap; cap=$(left "$2"); shift 2
  if [ "$cap" -lt 20 ]; then echo "[gpu_checks] $name skipped: ${cap} s left"; return; fi
  local start=$SECONDS
  timeout "$cap" "$@" 2>&1 | grep --line-buffered -v "it/s\]\|s/it\]" > "$LOGS/$name.log"
  echo "[gpu_checks] $name: rc ${PIPESTATUS[0]}, $((SECONDS - start)) s (cap $cap s)"
  grep -E "^\||stage 2 / stage 1|_s\"|_diff\"|over_base|gates|built|time budget|error|Error" "$LOGS/$name.log" | tail -n 30
  pack
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$LOGS/gpu.txt"

if has world; then
  run world 190 $PY scripts/build_toy_world.py --output_dir "$WORK/toy_world" $WORLD_FLAGS
  tar -czf "$OUT/toy_world.tgz" -C "$WORK" toy_world && ls -l "$OUT/toy_world.tgz"
fi

if has bench; then
  run bench_512 170 $PY scripts/bench.py --model "$BENCH_MODEL" --resolution "${RES1:-512}" \
    --extra="--mixed_precision bf16" --json "$LOGS/bench_512.json" --workdir "$WORK/b"
  model=$WORK/b/$BENCH_MODEL
  run bench_512_compile 140 $PY scripts/bench.py --model "$model" --resolution "${RES1:-512}" \
    --designs stage1,stage2 --extra="--mixed_precision bf16 --compile" --json "$LOGS/bench_512_compile.json" \
    --workdir "$WORK/bc"
  run bench_1024 90 $PY scripts/bench.py --model "$model" --resolution "${RES2:-1024}" --designs stage1,stage2 \
    --extra="--mixed_precision bf16" --infer --json "$LOGS/bench_1024.json" --workdir "$WORK/b1024"
fi

echo "[gpu_checks] done in $SECONDS s"
