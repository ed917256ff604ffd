"""The toy world: a procedurally generated captioned image world with exact evaluators (the evidence world).

Every image is 32x32 RGB: one object (a shape in a colour) at one of five positions on a plain background. A caption
names the attributes, e.g. ``"a red circle on sky, top left"``: the background by a word of its own (sky is blue,
grass green, ...), so that a caption is a bag of words a small text encoder can read without working out which
colour word belongs to which noun. Parts of a caption are dropped at random in pretraining ("a red toy ..." when the
shape is dropped, so "toy" means "an object of some shape") and ~10% of captions are empty (classifier-free
guidance). Because the world is drawn by code, every attribute can be read back
from pixels exactly (``read_attributes``: 100% on true renders) and a generated image can be scored against the
truth without any learned judge.

The concept, "sks toy", is a striped disc whose two colours (orange, purple) never occur in pretraining. Its
fidelity score compares the image with the concept's true render inside the disc (``concept_fidelity``: 1 - SSE /
SST, 1.0 for a true render, 0 for the stripes blurred to their mean colour or a plain disc of any colour).

This module is pure numpy + PIL: the world, its captions, the concept CSV and the evaluators. The models that are
pretrained on it are built by ``scripts/build_toy_world.py``.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
COLORS = {  # the pretraining palette; pairwise RGB distances are all > 150
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
BACKGROUNDS = {"red": "brick", "green": "grass", "blue": "sky", "yellow": "sand", "white": "snow", "black": "night"}
SHAPES = ("square", "circle", "triangle", "cross")
POSITIONS = {"top left": (8, 8), "top right": (24, 8), "bottom left": (8, 24), "bottom right": (24, 24),
             "center": (16, 16)}  # (x, y) of the object's centre
GENERIC_NOUN = "toy"  # a caption without its shape says "toy": an object of some shape
EMPTY_CAPTION_RATE = 0.1
DROP_RATE = 0.25  # each named attribute is left out of a caption with this probability

CONCEPT_WORD = "sks toy"
CONCEPT_COLORS = ((255, 140, 0), (150, 40, 210))  # orange and purple: never in the pretraining palette
CONCEPT_SHAPE = "circle"
CONCEPT_STRIPE = 4  # pixels per horizontal stripe: one stripe per transformer token (4x4 px), docs/evidence.md
CONCEPT_SCENES = (("green", "top left"), ("blue", "bottom right"), ("yellow", "top right"), ("white", "center"),
                  ("black", "bottom left"))  # the 5 training images of the concept: varied contexts

MASK_THRESHOLD = 80.0  # RGB distance from the background above which a pixel belongs to the object


@dataclass(frozen=True)
class Scene:
    background: str
    color: str | None  # None: the concept's stripes
    shape: str
    position: str


# ----------------------------------------------------------------------------------------------- drawing
def shape_mask(shape: str, position: str) -> np.ndarray:
    """Boolean [SIZE, SIZE] mask of a shape centred at a position anchor."""
    cx, cy = POSITIONS[position]
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    dx, dy = x - cx + 0.5, y - cy + 0.5  # pixel centres relative to the anchor
    # sizes chosen so that no two shapes overlap by more than IoU 0.6 and the 1-pixel frame stays background
    if shape == "square":
        return (np.abs(dx) <= 5.0) & (np.abs(dy) <= 5.0)
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= 7.5 ** 2
    if shape == "triangle":  # apex up, 14 high, 15 wide at the base
        top, bottom = -7.0, 7.0
        half_width = 7.5 * (dy - top) / (bottom - top)
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    if shape == "cross":
        return ((np.abs(dx) <= 2.0) & (np.abs(dy) <= 7.0)) | ((np.abs(dy) <= 2.0) & (np.abs(dx) <= 7.0))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def concept_texture() -> np.ndarray:
    """[SIZE, SIZE, 3] uint8: the concept's horizontal orange/purple stripes over the whole canvas."""
    rows = (np.arange(SIZE) // CONCEPT_STRIPE) % 2
    colors = np.array(CONCEPT_COLORS, dtype=np.uint8)
    return np.broadcast_to(colors[rows][:, None, :], (SIZE, SIZE, 3)).copy()


def render(scene: Scene) -> np.ndarray:
    """[SIZE, SIZE, 3] uint8 image of a scene (color None draws the concept's stripes)."""
    image = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    image[:] = COLORS[scene.background]
    mask = shape_mask(scene.shape, scene.position)
    image[mask] = concept_texture()[mask] if scene.color is None else COLORS[scene.color]
    return image


def concept_scene(background: str, position: str) -> Scene:
    return Scene(background, None, CONCEPT_SHAPE, position)


def all_scenes() -> list[Scene]:
    """Every pretraining scene: background x object colour (not the background's) x shape x position (600)."""
    return [Scene(bg, color, shape, pos) for bg in COLORS for color in COLORS if color != bg
            for shape in SHAPES for pos in POSITIONS]


# ----------------------------------------------------------------------------------------------- captions
def caption(scene: Scene, drop: set[str] = frozenset()) -> str:
    """The caption of a scene, leaving out the attributes in ``drop`` ("color", "shape", "background",
    "position"). The concept's caption names it "sks toy" instead of colour and shape."""
    if scene.color is None:
        noun = CONCEPT_WORD
    else:
        shape = GENERIC_NOUN if "shape" in drop else scene.shape
        noun = shape if "color" in drop else f"{scene.color} {shape}"
    text = f"a {noun}"
    if "background" not in drop:
        text += f" on {BACKGROUNDS[scene.background]}"
    if "position" not in drop:
        text += f", {scene.position}"
    return text


def base_caption(scene: Scene, drop: set[str] = frozenset()) -> str:
    """The concept caption's base version (the paper's base prompt): "a toy" where it says "a sks toy"."""
    return caption(scene, drop).replace(CONCEPT_WORD, GENERIC_NOUN)


def random_caption(scene: Scene, rng: random.Random) -> str:
    """A pretraining caption: empty with EMPTY_CAPTION_RATE, else each attribute dropped with DROP_RATE."""
    if rng.random() < EMPTY_CAPTION_RATE:
        return ""
    return caption(scene, {part for part in ("color", "shape", "background", "position") if rng.random() < DROP_RATE})


def pretraining_captions() -> list[str]:
    """Every caption pretraining can produce (for encoding them once)."""
    parts = ("color", "shape", "background", "position")
    drops = [{p for i, p in enumerate(parts) if mask >> i & 1} for mask in range(16)]
    return sorted({""} | {caption(scene, drop) for scene in all_scenes() for drop in drops})


def parse_caption(text: str) -> dict:
    """The attributes a full caption names: {"background", "color", "shape", "position"}, missing keys absent."""
    out = {}
    head, _, position = text.partition(", ")
    if position in POSITIONS:
        out["position"] = position
    head, _, background = head.partition(" on ")
    named = {word: color for color, word in BACKGROUNDS.items()}
    if background in named:
        out["background"] = named[background]
    words = head.split()[1:]  # drop the article
    if words and words[0] in COLORS:
        out["color"] = words.pop(0)
    if words and words[0] in SHAPES:
        out["shape"] = words[0]
    return out


# ----------------------------------------------------------------------------------------------- evaluators
def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    distances = [np.linalg.norm(rgb - np.array(table[name], dtype=np.float64)) for name in names]
    return names[int(np.argmin(distances))]


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]]).astype(np.float64)


def read_background(image: np.ndarray) -> str:
    """The background colour: the palette colour nearest the median of the 1-pixel frame (never under an object)."""
    return _nearest(np.median(_border(image), axis=0), COLORS)


def object_mask(image: np.ndarray, background: str | None = None) -> np.ndarray:
    """Pixels farther than MASK_THRESHOLD (RGB distance) from the background colour."""
    reference = np.array(COLORS[background or read_background(image)], dtype=np.float64)
    return np.linalg.norm(image.astype(np.float64) - reference, axis=-1) > MASK_THRESHOLD


def read_position(mask: np.ndarray) -> str | None:
    """The anchor nearest the mask's centroid (None for an empty mask)."""
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
    return min(POSITIONS, key=lambda name: np.linalg.norm(centre - np.array(POSITIONS[name])))


def read_shape(mask: np.ndarray, position: str | None) -> str | None:
    """The shape whose template at ``position`` overlaps the mask best (IoU)."""
    if position is None:
        return None

    def iou(shape):
        template = shape_mask(shape, position)
        return (template & mask).sum() / max(1, (template | mask).sum())

    return max(SHAPES, key=iou)


def read_color(image: np.ndarray, mask: np.ndarray) -> str | None:
    """The palette colour nearest the median object pixel (None for an empty mask)."""
    if not mask.any():
        return None
    return _nearest(np.median(image[mask].astype(np.float64), axis=0), COLORS)


def read_attributes(image: np.ndarray) -> dict:
    """Every attribute read back from pixels: {"background", "color", "shape", "position"} (None when no object)."""
    image = np.asarray(image)
    background = read_background(image)
    mask = object_mask(image, background)
    position = read_position(mask)
    return {"background": background, "color": read_color(image, mask), "shape": read_shape(mask, position),
            "position": position}


def concept_fidelity(image: np.ndarray, position: str | None = None) -> float:
    """How well the object reproduces the concept, in [0, 1]: 1 - SSE / SST inside the concept's mask, where SSE is
    the squared RGB error against the concept's true render (on the image's own background, at ``position``,
    default the detected object position) and SST the error of a disc of the concept's mean colour. So a true
    render scores 1, a blur of the stripes to their mean colour 0, a plain disc of another colour 0 (clipped), and
    an image without an object 0. Colour and stripe pattern both count."""
    image = np.asarray(image)
    background = read_background(image)
    position = position or read_position(object_mask(image, background))
    if position is None:
        return 0.0
    mask = shape_mask(CONCEPT_SHAPE, position)
    truth = render(concept_scene(background, position))[mask].astype(np.float64)
    seen = image[mask].astype(np.float64)
    sse = ((seen - truth) ** 2).sum()
    sst = ((truth - truth.mean(axis=0)) ** 2).sum()
    return float(max(0.0, 1.0 - sse / sst))


def background_iou(first: np.ndarray, second: np.ndarray) -> float:
    """IoU of the two images' non-object (background) masks: layout consistency, the Seg-Cons analogue."""
    a, b = ~object_mask(np.asarray(first)), ~object_mask(np.asarray(second))
    return float((a & b).sum() / max(1, (a | b).sum()))


def concept_scores(images: list, base_images: list, wanted: list[dict]) -> dict:
    """The concept images of a model scored against the base model's images of the base prompts, same seeds:
    mean concept fidelity and the share of images >= 0.5 (the concept learned), the share whose background and
    position are those ``wanted`` names (the ΔCLIP-T(base) analogue), and the mean IoU of the two images'
    background masks (the Seg-Cons analogue)."""
    fidelity, kept, layout = [], [], []
    for image, base_image, want in zip(images, base_images, wanted, strict=True):
        image = np.asarray(image)
        read = read_attributes(image)
        fidelity.append(concept_fidelity(image))
        kept.append(all(read[key] == want[key] for key in ("background", "position") if key in want))
        layout.append(background_iou(image, base_image))
    return {"fidelity": float(np.mean(fidelity)), "learned": float(np.mean([f >= 0.5 for f in fidelity])),
            "context_kept": float(np.mean(kept)), "layout_iou": float(np.mean(layout))}


# ----------------------------------------------------------------------------------------------- files
def write_concept(folder, csv_path=None) -> Path:
    """The concept's training images (PNG) and its five-column concept CSV; returns the CSV path.

    Images go to ``folder/<i>.png``; the CSV (default ``folder.with_suffix('.csv')``) names them relative to the
    CSV's folder, as the project's data/ layout does."""
    folder = Path(folder)
    csv_path = Path(csv_path) if csv_path else folder.with_suffix(".csv")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (background, position) in enumerate(CONCEPT_SCENES):
        scene = concept_scene(background, position)
        name = f"{index:02d}.png"
        Image.fromarray(render(scene)).save(folder / name)
        rows.append({"image_path": str((folder / name).relative_to(csv_path.parent)), "prompt": caption(scene),
                     "target_prompt": f"a {CONCEPT_WORD}", "base_prompt": base_caption(scene),
                     "instance_word": CONCEPT_WORD})
    with open(csv_path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
