"""Generation with trained LoRAs, shared by infer.py and eval.py: LoRA folders as named adapters on a stock
StableDiffusion3Pipeline, their learned concept tokens registered, ``[v]`` placeholders filled, images rendered
with one seeded CPU generator per image so every model sees the same noise."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .checks import BadInput, require
from .concept_token import LearnedToken, read_learned_token, register_token
from .data import NUMBERED_PLACEHOLDER
from .lora import DIFFUSERS_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, load_lora_as_adapter, lora_format, lora_misfit
from .quiet import dropped_log_messages, several_adapters_on_purpose

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_lora_folders(folders: list, model_path: str, flag: str = "--lora") -> list[LearnedToken | None]:
    """Each folder exists, holds a LoRA that fits the base model and at most one learned token not shared with
    another folder; returns each folder's learned token (or None). Reads file headers only."""
    for path in folders:
        folder = Path(path)
        require(folder.is_dir(), f"{flag} {folder}: no such folder. Point it at a stage-1 or stage-2 output folder, "
                "e.g. output/robot_toy.")
        require(lora_format(folder) is not None, f"{flag} {folder} holds no LoRA: expected {DIFFUSERS_WEIGHT_NAME} "
                f"(diffusers format) or {PEFT_CONFIG_NAME} + {PEFT_WEIGHT_NAME} (PEFT format). Has training finished?")
        misfit = lora_misfit(folder, model_path)
        require(misfit is None, f"{flag} {folder} does not fit --pretrained_model_name_or_path {model_path}: {misfit}. "
                "Was it trained on another base model?")
    tokens = [read_learned_token(path) for path in folders]
    owner = {}
    for path, token in zip(folders, tokens):
        if token is not None:
            require(token.token not in owner, f"{flag} {owner.get(token.token)} and {flag} {path} both learned the "
                    f"token {token.token}: retrain one of them with another --new_concept_token.")
            owner[token.token] = path
    return tokens


def fill_placeholders(template: str, concepts: list[str | None]) -> str:
    """``[v]`` / ``[v1]`` .. ``[vN]`` replaced by concept 1 .. N (a learned token or an instance word)."""

    def one(match):
        index = int(match.group(1) or 1)
        if index > len(concepts) or concepts[index - 1] is None:
            raise BadInput(f'Prompt "{template}" uses {match.group(0)} but concept {index} has no learned token and no '
                           f'--instance_word: pass --instance_word for it (e.g. --instance_word "sks robot toy", '
                           f"the CSV's instance_word column), in the order of --lora.")
        return concepts[index - 1]

    return NUMBERED_PLACEHOLDER.sub(one, template)


def has_placeholder(text: str) -> bool:
    return NUMBERED_PLACEHOLDER.search(text) is not None


def adapter_name(index: int) -> str:
    return f"lora{index + 1}"


def add_loras(pipe, folders: list, tokens: list) -> list[str]:
    """Register every learned token, then add every LoRA as a named adapter (lora1, lora2, ...); returns the names."""
    for token in tokens:
        if token is not None:
            register_token(pipe, token)
    names = [adapter_name(i) for i in range(len(folders))]
    for name, folder in zip(names, folders):
        load_lora(pipe, folder, name)
    return names


def load_lora(pipe, lora_dir, name: str) -> None:
    """One LoRA as adapter ``name``. Its strength goes through peft's ``set_scale`` (``pipe.set_adapters``):
    scaling = scale * alpha / r, so 0 is exactly the base model and 1 the trained strength."""
    if lora_format(lora_dir) == "diffusers":
        # weight_name explicit: offline diffusers does not guess it; alpha comes from the metadata. Text-encoder
        # LoRAs (stage 1 --train_text_encoder) load too; their absence is normal, not worth a warning.
        with dropped_log_messages("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"), \
                several_adapters_on_purpose():
            pipe.load_lora_weights(str(lora_dir), weight_name=DIFFUSERS_WEIGHT_NAME, adapter_name=name)
    else:  # PEFT folder: transformer only, as PeftModel.from_pretrained would load it
        load_lora_as_adapter(pipe.transformer, lora_dir, name, trainable=False)


def lora_components_of(pipe) -> list[str]:
    """The pipeline components that carry a LoRA (the transformer, and CLIP when stage 1 trained it)."""
    return [name for name in ("transformer", "text_encoder", "text_encoder_2")
            if getattr(getattr(pipe, name, None), "peft_config", None)]


@contextmanager
def adapters_off(pipe):
    """The exact base model: every adapter bypassed (fusing and unfusing would round the weights on the way)."""
    pipe.disable_lora()
    try:
        yield pipe
    finally:
        pipe.enable_lora()


def render(pipe, prompt: str, seeds: list[int], steps: int, guidance_scale: float, height: int, width: int,
           max_sequence_length: int, negative_prompt: str | None = None) -> list:
    """One image per seed for ``prompt``; image i from a CPU generator seeded seeds[i]."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipe(prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=len(generators),
                generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                width=width, max_sequence_length=max_sequence_length).images
