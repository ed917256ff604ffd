"""Checkpoints: checkpoint-N naming, rotation, the resume lookup and LoRA-only accelerate state.

A checkpoint-N folder holds the LoRA in both formats (docs/method.md section 6) plus accelerate's optimizer,
scheduler and RNG state; the frozen base weights are never written (accelerate would otherwise save the whole
transformer). It is written to ``checkpoint-N.tmp`` and renamed when complete, and older checkpoints are rotated
away only after that, so a run killed while saving always leaves its last complete checkpoint behind.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .checks import BadInput
from .lora import load_trainable_lora, write_trainable_lora

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def prune_checkpoints(output_dir, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints until at most ``total_limit`` remain (after a new one is complete)."""
    if total_limit is None:
        return []
    existing = list_checkpoints(output_dir)
    doomed = [path for _, path in existing[: max(0, len(existing) - total_limit)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None) -> Path:
    """Save accelerate state (our hooks write only the LoRA) as checkpoint-N, atomically, then rotate."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. rerun to the same step): replace it whole
            shutil.rmtree(final)
        staging.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def register_lora_state_hooks(accelerator, lora_parts: dict, base_model_name_or_path: str) -> None:
    """Make ``accelerator.save_state/load_state`` write and read only the trainable LoRA(s), in both formats.

    ``lora_parts`` maps a component name ("transformer", "text_encoder", "text_encoder_2") to (unwrapped model,
    adapter name)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            write_trainable_lora(output_dir, lora_parts, base_model_name_or_path)
        while weights:  # the frozen base weights stay out of the checkpoint
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            models.pop()
        load_trainable_lora(input_dir, lora_parts)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
