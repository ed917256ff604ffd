"""Checkpoints: the one place for checkpoint-N naming, rotation, resume lookup and LoRA-only accelerate state.

A checkpoint-N folder holds the LoRA in both formats (method.md section 6) plus accelerate's optimizer, scheduler
and RNG state; the frozen base weights are never written (accelerate would otherwise save the whole transformer).
It is written to ``checkpoint-N.tmp`` and renamed when complete, so a run killed while saving never leaves a
half-written checkpoint-N that "latest" would pick up.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from .args import BadInput
from .lora import DIFFUSERS_WEIGHT_NAME, adapter_state_dict, save_lora_both_formats

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


def prune_checkpoints(output_dir, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that saving one more keeps at most ``total_limit`` (prune before save)."""
    if total_limit is None:
        return []
    existing = list_checkpoints(output_dir)
    doomed = [path for _, path in existing[: max(0, len(existing) - total_limit + 1)]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


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


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def save_checkpoint(accelerator, output_dir, step: int, total_limit: int | None) -> Path:
    """Rotate, then save accelerate state (our hooks write only the LoRA) atomically as checkpoint-N."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit)
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. rerun to the same step): replace it whole
            shutil.rmtree(final)
        staging.rename(final)
    accelerator.wait_for_everyone()
    return final


def register_lora_state_hooks(accelerator, lora_parts: dict, config_of: dict, base_model_name_or_path: str) -> None:
    """Make ``accelerator.save_state/load_state`` write and read only the trainable LoRA(s), in both formats.

    ``lora_parts`` maps a component name ("transformer", "text_encoder", "text_encoder_2") to (unwrapped model,
    adapter name); ``config_of`` maps the same names to their LoraConfig."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            write_trainable_lora(output_dir, lora_parts, config_of, base_model_name_or_path)
        while weights:  # the frozen base weights stay out of the checkpoint
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            models.pop()
        tensors = load_file(str(Path(input_dir) / DIFFUSERS_WEIGHT_NAME))
        for component, (model, adapter_name) in lora_parts.items():
            prefix = f"{component}."
            state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
            result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"checkpoint {input_dir} does not match this run's LoRA layout "
                                 f"(e.g. {result.unexpected_keys[:2]}): resume with the same --rank/--lora_* flags.")

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def write_trainable_lora(output_dir, lora_parts: dict, config_of: dict, base_model_name_or_path: str) -> None:
    """Save the transformer LoRA (+ CLIP LoRAs if trained) of ``lora_parts`` in both formats."""
    transformer, adapter_name = lora_parts["transformer"]
    text_encoder_states = {
        component: (adapter_state_dict(model, name), config_of[component])
        for component, (model, name) in lora_parts.items() if component != "transformer"
    }
    save_lora_both_formats(output_dir, adapter_state_dict(transformer, adapter_name), config_of["transformer"],
                           text_encoder_states=text_encoder_states, base_model_name_or_path=base_model_name_or_path)
