"""Data loading for both training stages: instance folders, concept CSVs (method.md section 1), image
preprocessing and the training dataset.

Every check on user data runs here, before any model is loaded, and fails with one ``BadInput`` (a
``ValueError``) naming the file, row or column and what to do. No torchvision: preprocessing is PIL + numpy.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from .args import BadInput

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CSV_COLUMNS = ("image_path", "prompt", "target_prompt", "base_prompt", "instance_word")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_instance_images(folder) -> list[Path]:
    """The image files directly in ``folder``, sorted by name; anything else is skipped with one warning."""
    folder = Path(folder)
    expected = f"a folder holding image files ({', '.join(IMAGE_EXTENSIONS)}, any letter case)"
    if not folder.is_dir():
        raise BadInput(f"Image folder {folder} does not exist or is not a folder: expected {expected}.")
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    images = [p for p in entries if is_image_file(p)]
    skipped = [p.name for p in entries if not is_image_file(p)]
    if not images:
        found = f" (it holds only: {', '.join(skipped)})" if skipped else " (it is empty)"
        raise BadInput(f"Image folder {folder} has no images{found}: expected {expected}.")
    if skipped:
        # one warning for the whole folder, so a stray file is noticed without flooding the log
        warnings.warn(f"{folder}: skipping {len(skipped)} non-image entr{'y' if len(skipped) == 1 else 'ies'}: "
                      f"{', '.join(skipped)}", stacklevel=2)
    return images


@dataclass(frozen=True)
class ConceptRow:
    image_path: Path
    prompt: str
    target_prompt: str
    base_prompt: str
    instance_word: str


def read_concept_csv(data_path, csv_name) -> list[ConceptRow]:
    """Every row of ``<data_path>/<csv_name>`` (``csv_name`` may be absolute), checked: columns, cells, images."""
    csv_path = Path(data_path or ".") / csv_name
    if not csv_path.is_file():
        raise BadInput(f"Concept CSV {csv_path} not found (from --data_path {data_path!r} and --csv_name "
                       f"{csv_name!r}): check both flags; the CSV is <data_path>/<csv_name>.")
    table = _read_table(csv_path)
    _check_columns(table, csv_path)
    rows = []
    for number, record in enumerate(table.to_dict("records"), start=1):
        cells = {column: record[column].strip() for column in CSV_COLUMNS}
        for column in CSV_COLUMNS:
            if not cells[column]:
                raise BadInput(f"{csv_path}: data row {number}, column {column!r} is empty: every row needs all of "
                               f"{', '.join(CSV_COLUMNS)} filled in.")
        image_path = _resolve_image(cells["image_path"], data_path, csv_path, number)
        rows.append(ConceptRow(**dict(cells, image_path=image_path)))
    return rows


def _read_table(csv_path: Path) -> pd.DataFrame:
    try:
        # strings only: a prompt like "1" or "NA" must stay text; utf-8-sig drops an Excel byte-order mark
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise BadInput(f"Concept CSV {csv_path} is empty: it needs a header line ({','.join(CSV_COLUMNS)}) "
                       f"and one row per training image.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
        raise BadInput(f"Concept CSV {csv_path} cannot be read as a UTF-8 CSV ({type(err).__name__}: {err}); "
                       f"save it as comma-separated UTF-8 text with columns {','.join(CSV_COLUMNS)}.") from None
    table.columns = [str(column).strip() for column in table.columns]
    if table.empty:
        raise BadInput(f"Concept CSV {csv_path} has a header but no data rows: add one row per training image.")
    return table


def _check_columns(table: pd.DataFrame, csv_path: Path) -> None:
    missing = [column for column in CSV_COLUMNS if column not in table.columns]
    if missing:
        raise BadInput(f"Concept CSV {csv_path} lacks column(s) {', '.join(missing)}: the header must name "
                       f"{', '.join(CSV_COLUMNS)} (found: {', '.join(table.columns)}).")


def _resolve_image(cell: str, data_path, csv_path: Path, number: int) -> Path:
    """An absolute path as is; a relative one against --data_path first, then the working directory."""
    given = Path(cell)
    candidates = [given] if given.is_absolute() else [Path(data_path or ".") / given, Path.cwd() / given]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        looked = " and ".join(str(path) for path in candidates)
        raise BadInput(f"{csv_path}: data row {number}, column 'image_path': image {cell!r} not found (looked at "
                       f"{looked}); give a path that is absolute or relative to --data_path.")
    try:
        with Image.open(found) as image:
            image.verify()  # reads the whole file's structure, so a truncated or mislabelled file fails here
    except Exception as err:  # PIL raises several unrelated types for a bad file
        raise BadInput(f"{csv_path}: data row {number}, column 'image_path': {found} is not an image PIL can "
                       f"open ({type(err).__name__}: {err}); replace or re-save it.") from None
    return found


def load_image(path, resolution: int, center_crop: bool, flip: bool, rng: random.Random | None) -> torch.Tensor:
    """[3, resolution, resolution] float32 in [-1, 1]: EXIF-transposed, RGB, short side resized (Lanczos) to
    ``resolution``, cropped (centre, or at an offset drawn from ``rng``), mirrored if ``flip``."""
    if not center_crop and rng is None:
        raise ValueError("load_image: a random crop needs rng (a random.Random); pass one or center_crop=True.")
    with Image.open(path) as opened:
        # camera pictures store their rotation in EXIF: apply it so the model sees the upright picture
        image = ImageOps.exif_transpose(opened).convert("RGB")
    image = resize_short_side(image, resolution)
    image = crop_square(image, resolution, center_crop, rng)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1], as ToTensor + Normalize(0.5)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    # max() keeps rounding from leaving the short side a pixel under the crop size
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS) if size != image.size else image


def crop_square(image: Image.Image, resolution: int, center_crop: bool, rng: random.Random | None) -> Image.Image:
    spare_x, spare_y = image.width - resolution, image.height - resolution
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
    return image.crop((left, top, left + resolution, top + resolution))


class ConceptDataset(torch.utils.data.Dataset):
    """Items (``image_path`` + string prompt fields) as training examples, ``repeats`` times over.

    Augmentation for example ``i`` comes from a ``random.Random`` seeded by (seed, epoch, i) alone, so it is the
    same in every process and dataloader worker and after a resume, whatever was drawn before."""

    def __init__(self, items: list[dict], resolution: int, center_crop: bool = False, random_flip: bool = False,
                 repeats: int = 1, seed: int = 0):
        if not items:
            raise ValueError("ConceptDataset needs at least one item (a dict with 'image_path').")
        if repeats < 1:
            raise ValueError(f"ConceptDataset repeats must be >= 1, got {repeats}.")
        for number, item in enumerate(items):
            if "image_path" not in item:
                raise ValueError(f"ConceptDataset item {number} has no 'image_path' (keys: {sorted(item)}).")
        self.items = [dict(item, image_path=Path(item["image_path"])) for item in items]
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.repeats = repeats
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def example_rng(self, index: int) -> random.Random:
        # a string seed is hashed with sha512 by random.Random: stable across processes (no PYTHONHASHSEED)
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"ConceptDataset index {index} out of range 0..{len(self) - 1}")
        image_index = index % len(self.items)
        item = self.items[image_index]
        rng = self.example_rng(index)
        flip = self.random_flip and rng.random() < 0.5
        pixels = load_image(item["image_path"], self.resolution, self.center_crop, flip, rng)
        strings = {key: value for key, value in item.items() if isinstance(value, str)}
        # image_index keys the latent cache: by image, never by step, so a shuffled loader stays paired
        return {"pixel_values": pixels, "image_index": image_index, **strings}


def collate_examples(examples: list[dict]) -> dict:
    """A batch: stacked float32 pixels, image indices as a LongTensor, each string field as a list of str."""
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).to(torch.float32).contiguous(),
        "image_index": torch.tensor([e["image_index"] for e in examples], dtype=torch.long),
    }
    for key, value in examples[0].items():
        if isinstance(value, str):
            batch[key] = [e[key] for e in examples]
    return batch


def rows_to_items(rows: list[ConceptRow]) -> list[dict]:
    """Dataset items from CSV rows: image_path plus every text column."""
    return [dataclasses.asdict(row) for row in rows]


def folder_to_items(paths, prompt_key_values: dict) -> list[dict]:
    """Dataset items from a folder's images, every one with the same prompt fields (e.g. {"prompt": ...})."""
    for key, value in prompt_key_values.items():
        if not isinstance(value, str) or not value.strip():
            raise BadInput(f"Prompt field {key!r} must be a non-empty string, got {value!r}.")
    return [{"image_path": Path(path), **prompt_key_values} for path in paths]
