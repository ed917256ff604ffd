"""LoRA setup and I/O: the one place that decides target modules, adds/activates named adapters and reads and
writes both on-disk formats (docs/method.md section 6), for final outputs and checkpoints alike.

Formats (the two do not interoperate by themselves):
- diffusers: ``pytorch_lora_weights.safetensors``, keys ``transformer.<module>.lora_A.weight`` (and
  ``text_encoder.`` / ``text_encoder_2.`` when CLIP LoRAs are trained), the LoraConfig packed into the safetensors
  metadata so alpha survives; loads with ``StableDiffusion3Pipeline.load_lora_weights(dir)``.
- PEFT: ``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``;
  loads with ``PeftModel.from_pretrained(pipe.transformer, dir)`` (the authors' inference snippet). Transformer only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from .quiet import several_adapters_on_purpose

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"  # the key diffusers reads LoRA configs from

# The diffusers DreamBooth-LoRA-SD3 defaults: the joint-attention projections of every MM-DiT block.
DEFAULT_TRANSFORMER_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def parse_csv_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def transformer_target_modules(lora_layers: str | None, lora_blocks: str | None) -> list[str]:
    """--lora_layers narrows the module names, --lora_blocks the transformer blocks (diffusers' convention)."""
    layers = parse_csv_list(lora_layers) or list(DEFAULT_TRANSFORMER_TARGETS)
    blocks = parse_csv_list(lora_blocks)
    if not blocks:
        return layers
    return [f"transformer_blocks.{int(block)}.{layer}" for block in blocks for layer in layers]


def make_lora_config(rank: int, target_modules, dropout: float = 0.0) -> LoraConfig:
    # lora_alpha = rank (scale 1.0) and gaussian init: the diffusers SD3 recipe.
    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def transformer_lora_config(args) -> LoraConfig:
    """The transformer LoRA of a run: --rank, --lora_layers, --lora_blocks, --lora_dropout."""
    return make_lora_config(args.rank, transformer_target_modules(args.lora_layers, args.lora_blocks), args.lora_dropout)


def add_lora(model: torch.nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Add a new adapter to a diffusers model (``add_adapter``) or a transformers model (the CLIP encoders).

    transformers 5.24's ``add_adapter`` refuses peft < 0.22 (we pin 0.21.2), so a transformers model gets the
    same LoRA layers from peft's ``inject_adapter_in_model`` directly (it also sets ``model.peft_config``)."""
    if isinstance(model, PreTrainedModel):
        if adapter_name in getattr(model, "peft_config", {}):
            raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
        inject_adapter_in_model(config, model, adapter_name)
        return
    with several_adapters_on_purpose():
        model.add_adapter(config, adapter_name=adapter_name)


def add_trainable_lora(model: torch.nn.Module, config: LoraConfig, adapter_name: str, seed: int) -> None:
    """Add a fresh LoRA with a seeded gaussian init: both stages start from the same weights for the same seed,
    whatever else consumed the global RNG before (an extractor adapter, a data check)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    add_lora(model, config, adapter_name)
    torch.random.set_rng_state(state)


def tuner_layers(model: torch.nn.Module) -> list:
    """The model's LoRA layers (peft's tuner layers). Stage 2 takes them once, after every adapter is added:
    walking the model's modules on every adapter switch showed up in its profile (cProfile, evidence world)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def activate_adapter(model: torch.nn.Module, adapter_name: str, trainable: bool) -> None:
    """Make ``adapter_name`` the only active adapter of every LoRA layer.

    peft's set_adapter marks the activated adapter trainable unless ``inference_mode``; the others frozen. So
    activating the frozen extractor passes ``trainable=False`` and the trainable adapter is re-activated (and
    thereby re-marked trainable) *before* backward: switching after the forward pass silently zeroes its
    gradients."""
    for layer in tuner_layers(model):
        layer.set_adapter(adapter_name, inference_mode=not trainable)


def switch_adapter(layers: list, adapter_name: str) -> None:
    """Make ``adapter_name`` the only active adapter of every LoRA layer (``tuner_layers``) and leave every LoRA
    parameter as trainable or frozen as it was. peft's set_adapter also re-marks requires_grad (the activated adapter
    trainable, the others frozen); keeping the marks fixed means the trainable LoRA never looks frozen: not to
    autograd between a forward and its backward, and not to FSDP2, which takes each block's gradient dtype from these
    marks at its first forward (when that was the extractor's, it saw no trainable parameter and put bf16 gradients
    into the fp32 LoRA: the failure first seen on an H100, reproduced and fixed on the CPU).

    What a LoRA layer runs is its ``_active_adapter`` list (peft 0.21's set_adapter sets it after re-marking), so
    that is all this sets. Re-marking and then restoring every LoRA parameter twice a step was the largest Python
    cost of a stage-2 step on the evidence world (cProfile); without it the LoRAs come out bitwise the same and
    evidence.sh took 14.6 minutes instead of 15.4."""
    for layer in layers:
        layer._active_adapter = [adapter_name]


class adapters_disabled:
    """Context manager: every adapter of these LoRA layers (``tuner_layers``) off, i.e. the frozen base model (one
    shared copy of its weights). Which LoRA parameters train is left as it was (peft's enable_adapters(False) would
    freeze them all: ``switch_adapter``); what a LoRA layer skips is its ``_disable_adapters`` flag, which is all
    this sets."""

    def __init__(self, layers: list):
        self.layers = layers

    def __enter__(self):
        self.was_disabled = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True

    def __exit__(self, *exc):
        for layer, was_disabled in zip(self.layers, self.was_disabled):
            layer._disable_adapters = was_disabled
        return False


def adapter_state_dict(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """LoRA tensors of one adapter, keyed by module path (no adapter name), contiguous fp32 CPU copies. Under FSDP
    the parameters are shards (DTensors): each is gathered whole, a collective every process must join."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {key: full_tensor(value).detach().to("cpu", torch.float32).contiguous() for key, value in state.items()}


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with the file made readable like every other output: the pinned safetensors creates
    it 0600, unreadable to a shared group; here it gets the mode a plain open() gives (0666 minus the umask)."""
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _config_dict(config: LoraConfig) -> dict:
    out = config.to_dict()
    # sets do not serialise; keep a deterministic order so files are byte-stable.
    for key, value in list(out.items()):
        if isinstance(value, set):
            out[key] = sorted(value)
    return out


def save_lora_both_formats(out_dir, transformer_state: dict, config: LoraConfig,
                           text_encoder_states: dict | None = None, base_model_name_or_path: str | None = None) -> None:
    """Write the same tensors as a diffusers LoRA file and as a PEFT adapter folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = _config_dict(config)

    # diffusers format: prefixed keys, LoraConfig per component in the metadata so alpha survives the load.
    tensors = {f"transformer.{key}": value for key, value in transformer_state.items()}
    metadata = {f"transformer.{key}": value for key, value in config_dict.items()}
    for component, (state, te_config) in (text_encoder_states or {}).items():
        tensors.update({f"{component}.{key}": value for key, value in state.items()})
        metadata.update({f"{component}.{key}": value for key, value in _config_dict(te_config).items()})
    save_safetensors(tensors, out_dir / DIFFUSERS_WEIGHT_NAME,
                     metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})

    # PEFT format (transformer only: PeftModel wraps one model).
    save_safetensors({f"base_model.model.{key}": value for key, value in transformer_state.items()},
                     out_dir / PEFT_WEIGHT_NAME, metadata={"format": "pt"})
    peft_config = dict(config_dict, base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    (out_dir / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))


def lora_format(lora_dir) -> str | None:
    """'diffusers', 'peft' or None: which of our formats a folder holds (diffusers wins if both)."""
    lora_dir = Path(lora_dir)
    if (lora_dir / DIFFUSERS_WEIGHT_NAME).is_file():
        return "diffusers"
    if (lora_dir / PEFT_WEIGHT_NAME).is_file() and (lora_dir / PEFT_CONFIG_NAME).is_file():
        return "peft"
    return None


def lora_components(lora_dir) -> list[str]:
    """The models a LoRA folder holds adapters for: "transformer", plus "text_encoder" / "text_encoder_2" when a
    stage-1 run trained CLIP LoRAs (diffusers format only: a PEFT folder holds the transformer alone)."""
    lora_dir = Path(lora_dir)
    if lora_format(lora_dir) != "diffusers":
        return ["transformer"]
    with safe_open(str(lora_dir / DIFFUSERS_WEIGHT_NAME), framework="pt") as handle:
        prefixes = {key.split(".", 1)[0] for key in handle.keys()}
    return [c for c in ("transformer", "text_encoder", "text_encoder_2") if c in prefixes]


def _lora_file_and_prefix(lora_dir, component: str) -> tuple[Path, str]:
    lora_dir = Path(lora_dir)
    fmt = lora_format(lora_dir)
    if fmt == "diffusers":
        return lora_dir / DIFFUSERS_WEIGHT_NAME, f"{component}."
    if fmt == "peft" and component == "transformer":
        return lora_dir / PEFT_WEIGHT_NAME, "base_model.model."
    if fmt == "peft":
        raise ValueError(f"{lora_dir} is a PEFT folder: it holds the transformer LoRA only, not {component}.")
    raise FileNotFoundError(
        f"{lora_dir} holds no LoRA: expected {DIFFUSERS_WEIGHT_NAME} (diffusers format) or "
        f"{PEFT_CONFIG_NAME} + {PEFT_WEIGHT_NAME} (PEFT format).")


def lora_shapes(lora_dir, component: str = "transformer") -> dict[str, tuple[int, ...]]:
    """{module path key: shape} of one component's LoRA tensors, from the file header (no tensor is read)."""
    path, prefix = _lora_file_and_prefix(lora_dir, component)
    with safe_open(str(path), framework="pt") as handle:
        return {key[len(prefix):]: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()
                if key.startswith(prefix)}


def read_lora(lora_dir, component: str = "transformer") -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """One component's LoRA of a folder in either format, as (state dict keyed by module path, LoraConfig)."""
    path, prefix = _lora_file_and_prefix(lora_dir, component)
    state = {key[len(prefix):]: value for key, value in load_file(str(path)).items() if key.startswith(prefix)}
    if path.name == DIFFUSERS_WEIGHT_NAME:
        with safe_open(str(path), framework="pt") as handle:
            packed = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
        config_dict = {key[len(prefix):]: value for key, value in packed.items() if key.startswith(prefix)}
        if not config_dict:
            raise ValueError(f"{path} has no {component} LoRA config in its metadata, so its alpha is unknown: save "
                             "it with transformer_lora_adapter_metadata (our scripts do) or use the PEFT folder.")
    else:
        config_dict = json.loads((Path(lora_dir) / PEFT_CONFIG_NAME).read_text())
    if not state:
        raise ValueError(f"{lora_dir} holds no {component} LoRA tensors.")
    return state, lora_config_from_dict(config_dict)


def read_transformer_lora(lora_dir) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The transformer LoRA of a folder in either format, as (state dict keyed by module path, LoraConfig)."""
    return read_lora(lora_dir, "transformer")


def lora_config_from_dict(config_dict: dict) -> LoraConfig:
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {key: value for key, value in config_dict.items() if key in known}
    for key in ("peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode"):
        kwargs.pop(key, None)
    return LoraConfig(**kwargs)


def write_trainable_lora(output_dir, lora_parts: dict, base_model_name_or_path: str, writer: bool = True) -> None:
    """Save the trainable LoRA(s) of a run in both formats. ``lora_parts`` maps a component ("transformer",
    "text_encoder", "text_encoder_2") to (unwrapped model, adapter name); each adapter's LoraConfig is its own
    ``peft_config`` entry. Every process calls it (under FSDP gathering the tensors is collective); only the
    ``writer`` writes."""
    transformer, adapter_name = lora_parts["transformer"]
    text_encoder_states = {component: (adapter_state_dict(model, name), model.peft_config[name])
                           for component, (model, name) in lora_parts.items() if component != "transformer"}
    transformer_state = adapter_state_dict(transformer, adapter_name)
    if not writer:
        return
    save_lora_both_formats(output_dir, transformer_state, transformer.peft_config[adapter_name],
                           text_encoder_states=text_encoder_states, base_model_name_or_path=base_model_name_or_path)


def load_trainable_lora(input_dir, lora_parts: dict) -> None:
    """Put the LoRA tensors of a folder written by ``write_trainable_lora`` back into the run's adapters (resume)."""
    tensors = load_file(str(Path(input_dir) / DIFFUSERS_WEIGHT_NAME))
    for component, (model, adapter_name) in lora_parts.items():
        prefix = f"{component}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {input_dir} does not match this run's LoRA layout "
                             f"(e.g. {result.unexpected_keys[:2]}): resume with the same --rank/--lora_* flags.")


def load_lora_as_adapter(model: torch.nn.Module, lora_dir, adapter_name: str, trainable: bool = False,
                         component: str = "transformer") -> LoraConfig:
    """Add one component's LoRA of ``lora_dir`` (either format) to ``model`` as a named adapter, frozen unless
    ``trainable`` (an adapter added this way starts trainable). Keys that fit no module of the model are an error
    naming them, never a silent partial load."""
    state, config = read_lora(lora_dir, component)
    add_lora(model, config, adapter_name)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [key for key in getattr(result, "unexpected_keys", []) if "lora" in key]
    if unexpected:
        raise ValueError(f"the {component} LoRA in {lora_dir} does not fit this model: {len(unexpected)} of its keys "
                         f"name no module here, e.g. {', '.join(unexpected[:3])}")
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(trainable)
    return config


def load_text_encoder_loras(text_pipe, lora_dir, adapter_name: str) -> list[str]:
    """The CLIP LoRAs a stage-1 run trained (--train_text_encoder), added to the pipeline's CLIP encoders as a
    frozen, active adapter; returns the components loaded (none for a transformer-only LoRA)."""
    loaded = []
    for component in lora_components(lora_dir):
        if component != "transformer":
            load_lora_as_adapter(getattr(text_pipe, component), lora_dir, adapter_name, component=component)
            loaded.append(component)
    return loaded


# ----------------------------------------------------------------------------------------------- fit to a model
def base_weight_shapes(model_path, component: str) -> dict[str, tuple[int, ...]] | None:
    """{parameter name: shape} of a local model component, from its safetensors headers (no tensor is read);
    None when the folder is not local or holds no safetensors."""
    files = sorted((Path(model_path) / component).glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    return shapes


def lora_misfit(lora_dir, model_path) -> str | None:
    """Why the LoRA of ``lora_dir`` cannot go onto the model at ``model_path`` (the first key that names no module
    there, or whose shape disagrees with the module's weight), or None when it fits. Reads file headers only."""
    for component in lora_components(lora_dir):
        base = base_weight_shapes(model_path, component)
        if base is None:
            continue
        for key, shape in sorted(lora_shapes(lora_dir, component).items()):
            module, _, kind = key.partition(".lora_")
            weight = base.get(f"{module}.weight")
            if weight is None:
                return (f"{component} key {key} names a module ({module}) that the model does not have")
            if len(shape) != 2 or len(weight) != 2:
                continue
            expected = (shape[0], weight[1]) if kind.startswith("A") else (weight[0], shape[1])
            if shape != expected:
                return (f"{component} key {key} has shape {list(shape)}, but the model's {module}.weight is "
                        f"{list(weight)} (the LoRA needs {list(expected)})")
    return None
