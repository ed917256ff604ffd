"""Input checks that run before any model is loaded, and the one way a bad input ends a run.

Every check raises ``BadInput`` with one line naming the flag, file or row and what to do; ``exit_on_error`` prints
it as ``error: ...`` and exits with status 2 (a run that fails later with ``RunFailed``, e.g. a non-finite loss,
exits with status 3 the same way). Nothing here imports a model library: reading a model's
geometry means reading its config JSON, so a wrong flag is reported in the time it takes to start Python.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


class BadInput(ValueError):
    """A user input problem, reported before any work starts."""


class RunFailed(RuntimeError):
    """A run that cannot go on (e.g. a non-finite loss); raised before it writes anything more."""


def exit_on_error(main) -> None:
    """Run ``main``; a BadInput (exit status 2) or RunFailed (3) becomes one ``error:`` line on stderr."""
    try:
        main()
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise BadInput(message)


# ----------------------------------------------------------------------------------------------- numbers
def require_positive(args, *flags: str) -> None:
    """Each flag's value is a finite number > 0 (NaN and inf fail too)."""
    for flag in flags:
        value = getattr(args, flag)
        require(value is not None and math.isfinite(value) and value > 0,
                f"--{flag} must be a finite number above 0, got {value}.")


def require_non_negative(args, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag)
        require(value is not None and math.isfinite(value) and value >= 0,
                f"--{flag} must be a finite number >= 0, got {value}.")


def require_not_nan(args, *flags: str) -> None:
    for flag in flags:
        value = getattr(args, flag)
        require(not math.isnan(value), f"--{flag} is NaN: give a number (inf and -inf are allowed here).")


# ----------------------------------------------------------------------------------------------- model folder
def is_local_path(path: str) -> bool:
    """Anything that exists, starts like a path or has more than one '/' is a local folder, not a hub id."""
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def check_model_folder(path: str, flag: str = "--pretrained_model_name_or_path") -> None:
    """A local folder must look like a diffusers SD3 pipeline; a hub id is left to from_pretrained."""
    if not is_local_path(path):
        return
    local = Path(path)
    require(local.is_dir(), f"{flag} {path}: no such folder. Point it at a local SD3/SD3.5 diffusers folder (README: "
            "download) or build the tiny one: python -m utils.tiny_sd3 DIR --variant sd35")
    missing = [name for name in ("model_index.json", "transformer", "vae", "scheduler") if not (local / name).exists()]
    require(not missing, f"{flag} {path} is not a diffusers SD3 folder: missing {', '.join(missing)}.")


def read_component_config(model_path: str, component: str) -> dict | None:
    """A component's config.json of a local model folder (None for a hub id)."""
    path = Path(model_path) / component / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_resolution(model_path: str, resolution: int, flag: str = "--resolution") -> None:
    """``resolution`` must survive VAE downsampling and patching, and fit the transformer's position embedding."""
    vae, transformer = read_component_config(model_path, "vae"), read_component_config(model_path, "transformer")
    if vae is None or transformer is None:
        return
    downsample = 2 ** (len(vae["block_out_channels"]) - 1)
    multiple = downsample * transformer["patch_size"]
    require(resolution % multiple == 0, f"{flag} {resolution} must be a multiple of {multiple} for this model "
            f"(VAE downsampling x patch size); try {max(multiple, resolution // multiple * multiple)}.")
    max_patches = transformer.get("pos_embed_max_size")
    if max_patches:
        largest = max_patches * multiple
        require(resolution <= largest, f"{flag} {resolution} is larger than this model's position embedding can "
                f"hold ({max_patches} patches of {multiple} px = {largest} px); use {largest} or less.")


# ----------------------------------------------------------------------------------------------- output folder
def first_existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable_folder(path, flag: str) -> None:
    path = Path(path)
    require(not path.exists() or path.is_dir(), f"{flag} {path} exists and is not a folder.")
    require(os.access(first_existing_parent(path), os.W_OK), f"{flag} {path} is not writable.")
