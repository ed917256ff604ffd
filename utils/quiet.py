"""Known-harmless library messages, silenced at their source, one filter each (every other warning still shows).

- transformers, on import: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`": this project deliberately runs without torchvision, and the PIL processors it falls
  back to are the ones it wants.
- diffusers, on every ``model.to(dtype)``: "There are modules in X that should be kept in float32: []": the list is
  empty, so nothing is affected (a non-empty list still shows).

diffusers' "No LoRA keys associated to CLIPTextModel" is dropped only while a LoRA without CLIP parts loads
(utils/generation.load_lora: its absence is normal). PEFT's "Already found a `peft_config` attribute ...
multiple adapters" is dropped only while this project adds a named adapter (``several_adapters_on_purpose``):
stage 2's extractor beside the trainable LoRA, and the LoRAs that infer.py composes and eval.py compares.

The project's own warnings (a skipped file, an ignored flag, an unfinished extractor) print as one line,
``warning: ...``, instead of Python's two-line file:line form; every other warning keeps its usual form.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextmanager
def dropped_log_messages(logger_name: str, fragment: str):
    """Drop one logger's records that contain ``fragment`` while the block runs (everything else still shows)."""
    logger, drop = logging.getLogger(logger_name), _DropMessages(fragment)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextmanager
def several_adapters_on_purpose():
    """Drop PEFT's warning that a model which already has an adapter gets another ("Make sure to know what you are
    doing!") while the block runs: several named adapters on one model are this project's design."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        yield


_default_format = warnings.formatwarning


def _one_line(message, category, filename, lineno, line=None):
    if Path(filename).resolve().is_relative_to(PROJECT_ROOT) and ".venv" not in Path(filename).parts:
        return f"warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


def install() -> None:
    warnings.formatwarning = _one_line
    # the loggers exist (empty) before the libraries import; these are the names their messages come from
    logging.getLogger("transformers.utils.import_utils").addFilter(
        _DropMessages("requires torchvision (not installed); falling back to"))
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropMessages("should be kept in float32: []."))
