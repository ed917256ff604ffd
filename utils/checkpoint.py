"""Checkpoints and output folders: checkpoint-N naming, rotation, the resume lookup, the settings a resume must
share with the run it continues, the output-folder check, and LoRA-only accelerate state.

A checkpoint-N folder holds the LoRA in both formats (docs/method.md section 6) plus accelerate's optimizer,
scheduler and RNG state; the frozen base weights are never written (accelerate would otherwise save the whole
transformer). It is written to ``checkpoint-N.tmp`` and renamed when complete, and older checkpoints are rotated
away only after that, so a run killed while saving always leaves its last complete checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from accelerate.utils import DistributedType

from .args import RunConfig
from .checks import BadInput
from .lora import DIFFUSERS_WEIGHT_NAME, lora_format

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_NAME = "run_settings.json"
# what a resumed run must share with the run that saved the checkpoint, or it would not continue that run
RESUME_SETTINGS = ("stage", "max_train_steps", "num_train_epochs", "train_batch_size", "gradient_accumulation_steps",
                   "num_processes", "seed", "data")


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint-N under output_dir, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def resolve_resume(output_dir, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint folder to resume from, None to start fresh ("latest" with none saved yet), or BadInput."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        existing = list_checkpoints(output_dir)
        return existing[-1][1] if existing else None
    candidate = Path(resume_from_checkpoint)
    if not candidate.is_absolute() and not candidate.exists():
        candidate = Path(output_dir) / resume_from_checkpoint
    if not (candidate.is_dir() and CHECKPOINT_RE.match(candidate.name)):
        names = [path.name for _, path in list_checkpoints(output_dir)] or ["none"]
        raise BadInput(f"--resume_from_checkpoint {resume_from_checkpoint}: no such checkpoint in {output_dir} "
                       f"(found: {', '.join(names)}). Use a checkpoint-N name from there or \"latest\".")
    return candidate


def data_fingerprint(items: list[dict]) -> str:
    """sha256 over every training item's image bytes and text fields, in order: the data a run trains on."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(Path(item["image_path"]).read_bytes())
        for key in sorted(k for k, v in item.items() if isinstance(v, str)):
            digest.update(f"{key}={item[key]}".encode())
    return digest.hexdigest()[:16]


def run_settings(args, items: list[dict], stage: int) -> dict:
    """The settings of this run that a checkpoint (and the final output folder) records: RESUME_SETTINGS must match
    to resume from it; ``prompt_column`` tells eval.py which CSV column the LoRA trained on."""
    if stage == 2:
        prompt_column = "prompt"
    else:
        prompt_column = args.stage1_prompt_column if args.csv_name else "instance_prompt"
    return {"stage": stage, "prompt_column": prompt_column, "max_train_steps": args.max_train_steps, "num_train_epochs": args.num_train_epochs,
            "train_batch_size": args.train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            # accelerate sets WORLD_SIZE in every process it launches
            "num_processes": int(os.environ.get("WORLD_SIZE", "1")), "seed": args.seed,
            "data": data_fingerprint(items), "rank": args.rank, "learning_rate": args.learning_rate}


def check_resume_settings(resume_dir: Path, settings: dict) -> None:
    saved_path = resume_dir / SETTINGS_NAME
    if not saved_path.is_file():
        raise BadInput(f"--resume_from_checkpoint {resume_dir}: it records no {SETTINGS_NAME}, so this run cannot tell "
                       f"whether it continues the same training; start over with --overwrite_output_dir.")
    saved = json.loads(saved_path.read_text())
    differ = [key for key in RESUME_SETTINGS if saved.get(key) != settings[key]]
    if differ:
        described = ", ".join(f"{key}={saved.get(key)!r} there, {settings[key]!r} now" for key in differ)
        raise BadInput(f"--resume_from_checkpoint {resume_dir.name}: this run does not continue the one that saved "
                       f"it ({described}). Resume with the same settings and data, or start over with "
                       f"--overwrite_output_dir.")


def plan_run(args, output_dir: Path, items: list[dict], stage: int, extractor_dir: Path | None = None,
             validation_prompt: str | None = None) -> RunConfig:
    """The run's folders, decided before any model loads: the checkpoint to resume (checked against this run's
    settings), and whether ``output_dir`` may be written at all. A folder that holds a finished run or another run's
    checkpoints is refused unless --overwrite_output_dir (cleared when training starts) or --resume_from_checkpoint."""
    resume_dir = resolve_resume(output_dir, args.resume_from_checkpoint)
    settings = run_settings(args, items, stage)
    if resume_dir is not None:
        check_resume_settings(resume_dir, settings)
    elif args.resume_from_checkpoint == "latest" and not args.overwrite_output_dir:
        if lora_format(output_dir):
            raise BadInput(f"--resume_from_checkpoint latest: {output_dir} holds a finished run and no checkpoint to "
                           f"resume from; pass --overwrite_output_dir to train it again, or another --output_dir.")
        warnings.warn(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}; starting from step 0.",
                      stacklevel=2)
    elif not args.overwrite_output_dir:
        found = ([DIFFUSERS_WEIGHT_NAME] if lora_format(output_dir) else []) + \
                [path.name for _, path in list_checkpoints(output_dir)]
        if found:
            raise BadInput(f"--output_dir {output_dir} already holds a run ({', '.join(found[:4])}"
                           f"{', ...' if len(found) > 4 else ''}): pass --resume_from_checkpoint latest to continue it, "
                           f"--overwrite_output_dir to replace it, or choose another --output_dir.")
    return RunConfig(output_dir=output_dir, resume_dir=resume_dir, extractor_dir=extractor_dir, settings=settings,
                     validation_prompt=validation_prompt)


def clear_output_folder(output_dir: Path) -> None:
    """--overwrite_output_dir: remove this run's folder before training writes into it (this folder only: a
    stage-2 --output_dir holds the stage-1 LoRAs beside it, which stay)."""
    if output_dir.is_dir():
        shutil.rmtree(output_dir)


def prune_checkpoints(output_dir, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints until at most ``total_limit`` remain (after a new one is complete)."""
    if total_limit is None:
        return []
    existing = list_checkpoints(output_dir)
    doomed = [path for _, path in existing[: max(0, len(existing) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(accelerator, run: RunConfig, step: int, total_limit: int | None) -> Path:
    """Save accelerate state (our hooks write only the LoRA) and the run's settings as checkpoint-N, atomically,
    then rotate."""
    final = run.output_dir / f"checkpoint-{step}"
    staging = run.output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_settings(staging, run)
        if final.exists():  # the same step saved again (e.g. rerun to the same step): replace it whole
            shutil.rmtree(final)
        staging.rename(final)
        prune_checkpoints(run.output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def write_settings(folder: Path, run: RunConfig) -> None:
    (Path(folder) / SETTINGS_NAME).write_text(json.dumps(run.settings, indent=2, sort_keys=True) + "\n")


def register_state_hooks(accelerator, trained) -> None:
    """Make ``accelerator.save_state/load_state`` write and read only what the run trains (``trained``, a
    utils.outputs.TrainedWeights: the LoRA(s) in both formats and the concept token), never the frozen base.

    Under DeepSpeed and FSDP accelerate saves and restores its wrapped model itself before these hooks run (so
    such checkpoints also hold the base weights); the hooks then add our LoRA files and leave the model's restore
    to accelerate."""
    wrapped = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)

    def save_hook(models, weights, output_dir):
        trained.write(output_dir, writer=accelerator.is_main_process)  # every process: FSDP gathers the LoRA
        while weights:  # the frozen base weights stay out of the checkpoint
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            models.pop()
        trained.restore(input_dir, lora_too=not wrapped)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
