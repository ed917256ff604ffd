#!/usr/bin/env bash
# The GPU figures of the README in one go, on one CUDA GPU, each part bounded so the whole fits one device call:
#   world  scripts/build_toy_world.py on the GPU (the evidence world; packed to $OUT/toy_world.tgz)
#   bench  scripts/bench.py on SD3.5 Medium's real configs (random weights, bf16): each stage compiled at 512 px;
#          stage 1, stage 2 and the authors' design at 512 px (EAGER_DESIGNS picks); both at 1024 px with base /
#          LoRA / fused-LoRA generation (SKIP_1024=1 skips)
#   cudagraphs  each stage compiled at 512 px with inductor's CUDA graphs (bench.py --inductor_cudagraphs), stage 2
#          first (stage 1 was measured on the H200 on 2026-11-27)
#   fsdp   stage 2 launched with configs/single_gpu.yaml and with configs/fsdp.yaml (1 process: the wrapper path) on
#          the tiny SD3.5 model in bf16, a resume of the FSDP run from its step-2 checkpoint, and how far the LoRAs
#          are apart (fsdp_compare.json)
#   levers scripts/bench.py on SD3.5 Medium's real configs, both stages, one memory lever at a time (LEVERS picks
#          among --gradient_checkpointing, --base_quantization nf4 / int8, --use_8bit_adam, --cache_latents,
#          configs/fsdp.yaml with 1 process, --compile --text_encoder_device cpu, at 512 or 1024 px; the default
#          is what no GPU has measured yet); PARALLEL=1 runs them all at once (memory peaks only: their step times
#          disturb each other)
# Logs and JSON go to $OUT/results.tgz (default OUT=./output/gpu_checks).
#   bash scripts/gpu_checks.sh [world,bench,cudagraphs,fsdp,levers]
# Try it on a CPU first with tiny settings:
#   BENCH_MODEL=tiny_sd35 RES1=64 RES2=96 WORLD_FLAGS="--device cpu --vae_steps 5 --transformer_steps 5 \
#     --eval_samples 4 --eval_every 0" bash scripts/gpu_checks.sh
#   FSDP_SHIM=tests/fsdp_on_cpu.py ACCELERATE_USE_CPU=1 MP=no BENCH_MODEL=tiny_sd35 RES1=64 RES2=96 \
#     bash scripts/gpu_checks.sh fsdp,levers
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
  grep -E "^\||^\[bench\]|stage 2 / stage 1|_s\"|_diff\"|over_base|gates|built|time budget|error|Error" \
    "$LOGS/$name.log" | tail -n 30
  [ -n "${IN_BACKGROUND:-}" ] || pack  # parallel runs pack once, together
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$LOGS/gpu.txt"

if has world; then
  run world 190 $PY scripts/build_toy_world.py --output_dir "$WORK/toy_world" $WORLD_FLAGS
  tar -czf "$OUT/toy_world.tgz" -C "$WORK" toy_world && ls -l "$OUT/toy_world.tgz"
fi

model=$WORK/b/$BENCH_MODEL
ensure_model() {  # the benchmark model, built once (sd35m: on the GPU in bf16, ~50 s) and shared by every part
  [ -f "$model/model_index.json" ] && return
  case $BENCH_MODEL in
    sd35m) $PY -c "import sys, torch; from utils.tiny_sd3 import build_sd35m
build_sd35m(sys.argv[1], device='cuda', dtype=torch.bfloat16)" "$model" ;;
    *) $PY -m utils.tiny_sd3 "$model" --variant sd35 ;;
  esac
}
R1=${RES1:-512}; R2=${RES2:-1024}

# Compiled runs measure one stage each (bench.py makes stage 2's extractor with one eager step): on the H200 a cold
# inductor cache took ~80 s before stage 1's first compiled step, and 170 s was too little for both stages.
compiled() {  # compiled NAME STAGE CAP [bench.py flags]: one stage, compiled, at RES1
  local name=$1 stage=$2 cap=$3; shift 3
  run "$name" "$cap" $PY scripts/bench.py --model "$model" --resolution "$R1" --designs "$stage" \
    --extra="--mixed_precision bf16 --compile" --json "$LOGS/$name.json" --workdir "$WORK/$name" "$@"
}

if has bench; then
  ensure_model
  compiled bench_512_compile_stage1 stage1 200
  compiled bench_512_compile_stage2 stage2 300
  run bench_512 170 $PY scripts/bench.py --model "$model" --resolution "$R1" \
    --designs "${EAGER_DESIGNS:-stage1,stage2,authors}" --extra="--mixed_precision bf16" \
    --json "$LOGS/bench_512.json" --workdir "$WORK/be"
  if [ -z "${SKIP_1024:-}" ]; then
    run bench_1024 90 $PY scripts/bench.py --model "$model" --resolution "$R2" --designs stage1,stage2 \
      --extra="--mixed_precision bf16" --infer --json "$LOGS/bench_1024.json" --workdir "$WORK/b1024"
  fi
fi

if has cudagraphs; then  # experiment: inductor's CUDA graphs over the compiled regions (bench.py --inductor_cudagraphs)
  ensure_model
  compiled bench_512_cudagraphs_stage2 stage2 300 --inductor_cudagraphs
  compiled bench_512_cudagraphs_stage1 stage1 200 --inductor_cudagraphs
fi

LAUNCH=($PY -m accelerate.commands.launch)
MP=${MP:-bf16}
if has fsdp; then
  f=$WORK/fsdp
  $PY -m utils.tiny_sd3 "$f/tiny" --variant sd35
  common=(--pretrained_model_name_or_path "$f/tiny" --data_path data --csv_name robot_toy.csv --resolution 64
          --max_train_steps 4 --checkpointing_steps 2 --learning_rate 1e-3 --seed 3 --mixed_precision "$MP"
          --report_to none)
  single=(--config_file configs/single_gpu.yaml --mixed_precision "$MP")
  sharded=(--config_file configs/fsdp.yaml --num_processes 1 --mixed_precision "$MP" ${FSDP_SHIM:-})
  run fsdp_stage1 60 "${LAUNCH[@]}" "${single[@]}" train_stage1_sd3.py "${common[@]}" --output_dir "$f/s1"
  run fsdp_single 60 "${LAUNCH[@]}" "${single[@]}" train_stage2_v2_sd3.py "${common[@]}" \
    --stage1_output_dir "$f/s1" --output_dir "$f/single"
  run fsdp_sharded 60 "${LAUNCH[@]}" "${sharded[@]}" train_stage2_v2_sd3.py "${common[@]}" \
    --stage1_output_dir "$f/s1" --output_dir "$f/sharded"
  mkdir -p "$f/resumed/robot_toy" && cp -r "$f/sharded/robot_toy/checkpoint-2" "$f/resumed/robot_toy/"
  run fsdp_resumed 60 "${LAUNCH[@]}" "${sharded[@]}" train_stage2_v2_sd3.py "${common[@]}" \
    --stage1_output_dir "$f/s1" --output_dir "$f/resumed" --resume_from_checkpoint latest \
    --validation_prompt "a sks robot toy" --num_validation_images 1 --validation_steps 2
  run fsdp_compare 30 $PY - "$f" "$LOGS/fsdp_compare.json" <<'PYEOF'
import json, sys
from pathlib import Path
from utils.lora import read_transformer_lora
root = Path(sys.argv[1])
loras = {}
for name in ("single", "sharded", "resumed"):
    try:
        loras[name] = {k: v.float() for k, v in read_transformer_lora(root / name / "robot_toy")[0].items()}
    except Exception as error:  # a failed run leaves no LoRA; say which
        print(f"{name}: {error}")
def max_diff(a, b):
    if a not in loras or b not in loras:
        return None
    return max((loras[a][k] - loras[b][k]).abs().max().item() for k in loras[a])
def relative_l2(a, b):  # |a - b| / |a| over every LoRA tensor: a max diff near 4 x lr says little in bf16
    if a not in loras or b not in loras:
        return None
    diff = sum(((loras[a][k] - loras[b][k]) ** 2).sum().item() for k in loras[a]) ** 0.5
    return diff / sum((v ** 2).sum().item() for v in loras[a].values()) ** 0.5
lora_b = [v.abs().max().item() for k, v in loras.get("single", {}).items() if "lora_B" in k]
report = {"single_vs_fsdp": max_diff("single", "sharded"),
          "single_vs_fsdp_relative_l2": relative_l2("single", "sharded"),
          "fsdp_vs_resumed": max_diff("sharded", "resumed"), "largest_lora_B": max(lora_b, default=None),
          "validation_images": sorted(p.name for p in (root / "resumed" / "robot_toy" / "validation").glob("*.png"))
          if (root / "resumed" / "robot_toy" / "validation").is_dir() else []}
print(json.dumps(report))
Path(sys.argv[2]).write_text(json.dumps(report, indent=2) + "\n")
PYEOF
fi

if has levers; then
  # LEVERS: which runs, in this order: NAME:RESOLUTION:FLAGS with + for spaces; fsdp runs both stages under
  # configs/fsdp.yaml; NO_BNB=1 skips the bitsandbytes levers (CPU). PARALLEL=1 runs them all at once (a big GPU's
  # memory holds them): their memory peaks are each process's own, as alone, but their step times are not.
  # (default: what is still unmeasured; the H100 (2026-11-27) measured checkpointing at 1024 and nf4 at 512 px, the
  # H200 (same night, in parallel) nf4 / int8 / cache_latents at 1024, checkpointing / 8-bit Adam / FSDP at 512 and
  # stage 1 of compile_te_cpu: docs/bench; int8 and no lever at 1024 again, since training keeps less for backward
  # (README "Memory left for backward") and T5 visits the GPU one block at a time)
  LEVERS=${LEVERS:-"int8:$R2:--base_quantization+int8 none:$R2: compile_te_cpu:$R1:--compile+--text_encoder_device+cpu
int8:$R1:--base_quantization+int8 cache_latents:$R1:--cache_latents 8bit_adam:$R2:--use_8bit_adam"}
  ensure_model
  pids=()
  for entry in $LEVERS; do
    IFS=: read -r name res flags <<< "$entry"; flags=${flags//+/ }
    if [[ "$flags" == *"quantization"* || "$flags" == *"8bit"* ]] && [ -n "${NO_BNB:-}" ]; then continue; fi
    bench=(scripts/bench.py --model "$model" --resolution "$res" --designs stage1,stage2 --warmup 1 --steps 3
           --extra="--mixed_precision $MP $flags" --json "$LOGS/lever_${res}_$name.json"
           --workdir "$WORK/l_${res}_$name")
    if [ "$name" = fsdp ]; then
      cmd=("${LAUNCH[@]}" --config_file configs/fsdp.yaml --num_processes 1 --mixed_precision "$MP" ${FSDP_SHIM:-}
           "${bench[@]}")
    else
      cmd=($PY "${bench[@]}")
    fi
    if [ -n "${PARALLEL:-}" ]; then
      IN_BACKGROUND=1 run "lever_${res}_$name" "${LEVER_CAP:-180}" "${cmd[@]}" > "$LOGS/lever_${res}_$name.summary" &
      pids+=($!)
      sleep 2  # staggered starts: the processes do not all read the 15 GB model at the same moment
    else
      run "lever_${res}_$name" "${LEVER_CAP:-120}" "${cmd[@]}"  # the H100's first two steps took ~6 s each
    fi
  done
  if [ ${#pids[@]} -gt 0 ]; then
    wait "${pids[@]}"
    cat "$LOGS"/lever_*.summary
    pack
  fi
fi

echo "[gpu_checks] done in $SECONDS s"
