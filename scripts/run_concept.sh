#!/usr/bin/env bash
# PureCC for one concept: stage 1 (extractor LoRA) -> stage 2 (PureCC LoRA) -> sample images.
#
#   MODEL_NAME=/path/to/SD3.5-medium bash scripts/run_concept.sh data/robot_toy.csv [extra training flags...]
#
# Extra flags go to BOTH training stages. Outputs (OUTPUT_DIR defaults to ./output):
#   <out>/base_ckpt/<concept>/   stage 1 LoRA     <out>/<concept>/   stage 2 LoRA     <out>/<concept>/samples/
# A stage whose folder already holds pytorch_lora_weights.safetensors is skipped (FORCE=1 retrains); an interrupted
# stage resumes from its newest checkpoint-N. Every input of the stages that will train is checked before anything
# launches (--check_only, no model loaded): a bad input ends the run with the script's one error line and status 2,
# not with accelerate's traceback. Settings, as environment variables (default):
#   MODEL_NAME (required)  DATA_PATH (the CSV's folder)  OUTPUT_DIR (./output)  FORCE (0)  SAMPLES (1: render)
#   STAGE1_STEPS (1000)  STAGE2_STEPS (800)  RESOLUTION (512)  RANK (4)  STAGE1_LR (4e-4)  STAGE2_LR (1e-4)
#   ETA (2.0)  GRAD_ACCUM (4, stage 1 only, as the authors)  MIXED_PRECISION (bf16 on cuda, no on cpu)  SEED (0)
#   REPORT_TO (none)  INFER_STEPS (28)  NUM_IMAGES (2)  PYTHON (.venv/bin/python if present, else python3)
#   STAGE1_ARGS / STAGE2_ARGS / INFER_ARGS (extra flags for one step)  ACCELERATE_CONFIG (accelerate config, GPU)
#   CPU_THREADS (nproc, CPU only)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "[run_concept] $*"; }
die() { echo "error: $*" >&2; exit 2; }

# ------------------------------------------------------------------------------------------- inputs
[ $# -ge 1 ] || die "usage: MODEL_NAME=... bash scripts/run_concept.sh CONCEPT.csv [extra training flags...]"
CSV=$1; shift
[ -f "$CSV" ] || die "concept CSV $CSV not found: give the path of a CSV with columns image_path,prompt,target_prompt,base_prompt,instance_word (e.g. data/robot_toy.csv)."
[ -n "${MODEL_NAME:-}" ] || die "MODEL_NAME is not set: point it at an SD3/SD3.5 diffusers folder, e.g. MODEL_NAME=/path/to/SD3.5-medium, or build the tiny test model: python -m utils.tiny_sd3 tiny_models/sd35 --variant sd35 (then MODEL_NAME=tiny_models/sd35)."

CSV=$(cd "$(dirname "$CSV")" && pwd)/$(basename "$CSV")  # absolute: --csv_name may be absolute
CONCEPT=$(basename "$CSV" .csv)
DATA_PATH=${DATA_PATH:-$(dirname "$CSV")}
OUT=${OUTPUT_DIR:-./output}
STAGE1_DIR=$OUT/base_ckpt/$CONCEPT
STAGE2_DIR=$OUT/$CONCEPT
SAMPLE_DIR=$STAGE2_DIR/samples
WEIGHTS=pytorch_lora_weights.safetensors

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
CUDA=$("$PYTHON" -c 'import torch; print(torch.cuda.is_available())') \
  || die "$PYTHON cannot import torch: run bash scripts/setup.sh first, or set PYTHON to an interpreter that has the requirements."
if [ "$CUDA" = True ]; then DEFAULT_MP=bf16; else DEFAULT_MP=no; fi
STAGE1_STEPS=${STAGE1_STEPS:-1000}; STAGE2_STEPS=${STAGE2_STEPS:-800}; RESOLUTION=${RESOLUTION:-512}
RANK=${RANK:-4}; STAGE1_LR=${STAGE1_LR:-4e-4}; STAGE2_LR=${STAGE2_LR:-1e-4}; ETA=${ETA:-2.0}
GRAD_ACCUM=${GRAD_ACCUM:-4}; MIXED_PRECISION=${MIXED_PRECISION:-$DEFAULT_MP}; SEED=${SEED:-0}
REPORT_TO=${REPORT_TO:-none}; INFER_STEPS=${INFER_STEPS:-28}; NUM_IMAGES=${NUM_IMAGES:-2}
FORCE=${FORCE:-0}; SAMPLES=${SAMPLES:-1}
# extra flags per step, split with shell quoting: STAGE1_ARGS='--validation_prompt "a photo of sks robot toy"'
eval "STAGE1_EXTRA=(${STAGE1_ARGS:-})"
eval "STAGE2_EXTRA=(${STAGE2_ARGS:-})"
eval "INFER_EXTRA=(${INFER_ARGS:-})"

# accelerate through the chosen Python, so the venv's packages are used
LAUNCH=("$PYTHON" -m accelerate.commands.launch)
if [ "$CUDA" = True ]; then
  if [ -n "${ACCELERATE_CONFIG:-}" ]; then LAUNCH+=(--config_file "$ACCELERATE_CONFIG"); fi
else
  LAUNCH+=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
           --num_cpu_threads_per_process "${CPU_THREADS:-$(nproc)}")
fi
COMMON=(--pretrained_model_name_or_path "$MODEL_NAME" --data_path "$DATA_PATH" --csv_name "$CSV"
        --resolution "$RESOLUTION" --rank "$RANK" --mixed_precision "$MIXED_PRECISION" --seed "$SEED"
        --report_to "$REPORT_TO")

# ------------------------------------------------------------------------------------------- steps
# should_train DIR: 0 (train) unless DIR holds finished weights and FORCE is not 1
should_train() {
  [ "$FORCE" = 1 ] || [ ! -f "$1/$WEIGHTS" ]
}

# run_flags DIR [RETRAIN]: resume an interrupted run from its newest checkpoint-N, or (FORCE=1, or a stage 2 whose
# extractor was just retrained) replace whatever DIR holds
run_flags() {
  if [ "$FORCE" = 1 ] || [ "${2:-0}" = 1 ]; then
    echo "--overwrite_output_dir"
  elif compgen -G "$1/checkpoint-*" > /dev/null; then
    say "  resuming from the newest checkpoint in $1" >&2
    echo "--resume_from_checkpoint latest"
  fi
}


# The flags of each stage (after the decision which stages train: run1 / run2 are 1 when they do)
stage1_flags() {
  # shellcheck disable=SC2046
  STAGE1_FLAGS=("${COMMON[@]}" --output_dir "$STAGE1_DIR" --max_train_steps "$STAGE1_STEPS"
                --learning_rate "$STAGE1_LR" --gradient_accumulation_steps "$GRAD_ACCUM" $(run_flags "$STAGE1_DIR")
                ${STAGE1_EXTRA[@]+"${STAGE1_EXTRA[@]}"} "$@")
}

stage2_flags() {
  # stage 2 writes to <output_dir>/<csv stem>/ and finds the extractor at <output_dir>/base_ckpt/<csv stem>/;
  # a new extractor makes any earlier stage-2 LoRA stale, so it is replaced
  # shellcheck disable=SC2046
  STAGE2_FLAGS=("${COMMON[@]}" --output_dir "$OUT" --max_train_steps "$STAGE2_STEPS" --learning_rate "$STAGE2_LR"
                --eta "$ETA" $(run_flags "$STAGE2_DIR" "$run1") ${STAGE2_EXTRA[@]+"${STAGE2_EXTRA[@]}"} "$@")
}

# check_inputs: every input check of the stages that will train, before anything launches: both scripts'
# --check_only in one Python process, so their imports (~13 s on 2 cores) are paid once; each failure prints its
# script's one error line. A stage 2 whose extractor stage 1 has yet to train is checked without it
# (--extractor_mode base); all else is checked.
check_inputs() {
  [ "$run1" = 1 ] || [ "$run2" = 1 ] || return 0
  local extra=(); [ "$run1" = 1 ] && extra=(--extractor_mode base)  # stage 1 has not made the extractor yet
  "$PYTHON" - "$REPO" "$run1" "$run2" "${STAGE1_FLAGS[@]}" ::stage2:: "${STAGE2_FLAGS[@]}" ${extra[@]+"${extra[@]}"} \
    > /dev/null <<'PY' || exit 2
import sys
repo, run1, run2, *flags = sys.argv[1:]
sys.path.insert(0, repo)
import train_stage1_sd3, train_stage2_v2_sd3
from utils.checks import exit_on_error
split = flags.index("::stage2::")
status = 0
for run, script, argv in ((run1, train_stage1_sd3, flags[:split]), (run2, train_stage2_v2_sd3, flags[split + 1:])):
    if run == "1":
        try:
            exit_on_error(lambda: script.main(argv + ["--check_only"]))
        except SystemExit as stop:  # argparse's or exit_on_error's: the line is printed already
            status = status or stop.code or 0
sys.exit(status)
PY
}

# write_sample_prompts FILE: the CSV's prompts, then recontextualisations of its instance word as "[v]"
write_sample_prompts() {
  "$PYTHON" - "$CSV" "$1" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], encoding="utf-8-sig")))
prompts = list(dict.fromkeys(r["prompt"].strip() for r in rows if r.get("prompt", "").strip()))
if any((r.get("instance_word") or "").strip() for r in rows):
    prompts += ["a photo of [v] on the moon", "a watercolor painting of [v]", "[v] floating in a swimming pool"]
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(prompts) + "\n")
PY
}

instance_word() {
  "$PYTHON" -c 'import csv, sys; print(next((r.get("instance_word") or "").strip() for r in csv.DictReader(open(sys.argv[1], encoding="utf-8-sig"))))' "$CSV"
}

render_samples() {
  say "samples: stage-2 LoRA vs base model -> $SAMPLE_DIR"
  rm -rf "$SAMPLE_DIR"
  mkdir -p "$SAMPLE_DIR"
  write_sample_prompts "$SAMPLE_DIR/prompts.txt"
  local word; word=$(instance_word)
  "$PYTHON" "$REPO/infer.py" --pretrained_model_name_or_path "$MODEL_NAME" --lora "$STAGE2_DIR" \
    --prompts_file "$SAMPLE_DIR/prompts.txt" ${word:+--instance_word "$word"} --compare_base \
    --num_images_per_prompt "$NUM_IMAGES" --seed "$SEED" --num_inference_steps "$INFER_STEPS" \
    --height "$RESOLUTION" --width "$RESOLUTION" --output_dir "$SAMPLE_DIR" ${INFER_EXTRA[@]+"${INFER_EXTRA[@]}"}
}

# ------------------------------------------------------------------------------------------- main
say "concept $CONCEPT: $CSV (model $MODEL_NAME, device $([ "$CUDA" = True ] && echo cuda || echo cpu))"
run1=0; run2=0
should_train "$STAGE1_DIR" && run1=1
{ [ "$run1" = 1 ] || should_train "$STAGE2_DIR"; } && run2=1
stage1_flags "$@"
stage2_flags "$@"
check_inputs
if [ "$run1" = 1 ]; then
  t0=$SECONDS
  say "stage 1: training the extractor LoRA -> $STAGE1_DIR"
  "${LAUNCH[@]}" "$REPO/train_stage1_sd3.py" "${STAGE1_FLAGS[@]}"
  say "stage 1: done in $((SECONDS - t0)) s"
else
  say "stage 1: skip, $STAGE1_DIR already holds $WEIGHTS (FORCE=1 retrains)"
fi
if [ "$run2" = 1 ]; then
  t0=$SECONDS
  say "stage 2: training the PureCC LoRA -> $STAGE2_DIR"
  "${LAUNCH[@]}" "$REPO/train_stage2_v2_sd3.py" "${STAGE2_FLAGS[@]}"
  say "stage 2: done in $((SECONDS - t0)) s"
else
  say "stage 2: skip, $STAGE2_DIR already holds $WEIGHTS (FORCE=1 retrains)"
fi
if [ "$SAMPLES" = 1 ]; then
  t0=$SECONDS
  render_samples
  say "samples: done in $((SECONDS - t0)) s"
  say "done: images in $SAMPLE_DIR (grid: $SAMPLE_DIR/grid.png)"
else
  say "done (SAMPLES=0: no images rendered)"
fi
