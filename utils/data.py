"""Files -> items: instance folders, concept CSVs (docs/method.md section 1) and image files read as RGB.

Every check on user data runs here, before any model is loaded, and fails with one ``BadInput`` (a
``ValueError``) naming the file, row or column and what to do. Turning items into training batches is
``utils/dataset.py``'s job.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from .checks import BadInput

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CSV_COLUMNS = ("image_path", "prompt", "target_prompt", "base_prompt", "instance_word")
PLACEHOLDER = "[v]"  # stands for the concept in prompts: the learned token if there is one, else the instance word
NUMBERED_PLACEHOLDER = re.compile(r"\[v(\d*)\]")  # at inference, several concepts: [v] (= [v1]) or [v1] .. [vN]


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
    warn_about_prompts(rows, csv_path)
    return rows


def warn_about_prompts(rows: list[ConceptRow], csv_path: Path) -> None:
    """One warning per kind of suspicious row: a prompt that does not name the concept (neither its instance_word
    nor [v]) teaches stage 2 nothing about it, and a prompt equal to its base_prompt makes L_pure's two branches
    identical."""
    unnamed = [n for n, row in enumerate(rows, start=1)
               if row.instance_word not in row.prompt and PLACEHOLDER not in row.prompt]
    if unnamed:
        warnings.warn(f"{csv_path}: the prompt of data row(s) {', '.join(map(str, unnamed))} names neither its "
                      f"instance_word nor {PLACEHOLDER}: the model cannot tell which word is the concept.", stacklevel=3)
    same = [n for n, row in enumerate(rows, start=1) if row.prompt == row.base_prompt]
    if same:
        warnings.warn(f"{csv_path}: data row(s) {', '.join(map(str, same))} have prompt == base_prompt: the PureCC "
                      f"target is then the model's own prediction and the concept cannot be learned from them.",
                      stacklevel=3)


def read_prompt_rows(csv_path) -> list[dict]:
    """A concept CSV's text columns, row by row, for prompting (infer.py --csv): no image is opened."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise BadInput(f"Concept CSV {csv_path} not found: give the path of a CSV with columns {', '.join(CSV_COLUMNS)}.")
    table = _read_table(csv_path)
    _check_columns(table, csv_path)
    return [{column: str(record[column]).strip() for column in CSV_COLUMNS} for record in table.to_dict("records")]


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


def open_rgb(path) -> Image.Image:
    """An image file as 8-bit RGB, whatever mode PIL opens it in, EXIF rotation applied.

    ``Image.convert("RGB")`` alone gets several modes wrong: 16-bit greyscale (I;16, and I as older PNG readers give
    it) saturates to white, and float images (F) to black or white. Here 16- and 32-bit integer images are scaled
    from 0..65535, float images from 0..1, and images with transparency (RGBA, LA, PA, P with a transparent colour)
    are laid over white instead of having their hidden colour channels exposed. CMYK, YCbCr, 1 and L go through
    PIL's own conversion, which is exact for them."""
    with Image.open(path) as opened:
        # camera pictures store their rotation in EXIF: apply it so the model sees the upright picture
        image = ImageOps.exif_transpose(opened)
        image.load()
    if image.mode.startswith("I"):  # I, I;16, I;16B, I;16L, I;16N: 16-bit greyscale
        values = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64) * 255.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def fill_placeholder(text: str, concept: str) -> str:
    """``[v]`` (the release's placeholder) replaced by the concept: its learned token, else its instance word."""
    return text.replace(PLACEHOLDER, concept)


def resolve_placeholders(rows: list[ConceptRow], token: str | None, csv_path) -> list[ConceptRow]:
    """Every row with ``[v]`` in prompt and target_prompt replaced by ``token`` (a learned concept token) or, without
    one, by the row's instance_word, so a literal ``[v]`` never reaches a text encoder. A base_prompt is the sentence
    *without* the concept, so ``[v]`` there is an error naming the row."""
    for number, row in enumerate(rows, start=1):
        if PLACEHOLDER in row.base_prompt or PLACEHOLDER in row.instance_word:
            column = "base_prompt" if PLACEHOLDER in row.base_prompt else "instance_word"
            raise BadInput(f"{csv_path}: data row {number}, column {column!r} contains {PLACEHOLDER}: the base prompt "
                           f"is the sentence without the concept and the instance word is the concept itself; "
                           f"write them out.")
    return [dataclasses.replace(row, prompt=fill_placeholder(row.prompt, token or row.instance_word),
                                target_prompt=fill_placeholder(row.target_prompt, token or row.instance_word))
            for row in rows]


def rows_to_items(rows: list[ConceptRow]) -> list[dict]:
    """Dataset items from CSV rows: image_path plus every text column."""
    return [dataclasses.asdict(row) for row in rows]


def folder_to_items(paths, prompt_key_values: dict) -> list[dict]:
    """Dataset items from a folder's images, every one with the same prompt fields (e.g. {"prompt": ...})."""
    for key, value in prompt_key_values.items():
        if not isinstance(value, str) or not value.strip():
            raise BadInput(f"Prompt field {key!r} must be a non-empty string, got {value!r}.")
    return [{"image_path": Path(path), **prompt_key_values} for path in paths]
