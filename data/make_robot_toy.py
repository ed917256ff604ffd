"""Draw the example concept: 5 small pictures of a synthetic "robot toy" and its CSV (docs/method.md section 1).

The pictures are drawn from fixed parameters (no randomness, no downloads), so re-running this script gives
the same files; that lets a smoke run on a fresh machine train on a concept nobody has to fetch.

    python data/make_robot_toy.py                  # writes data/robot_toy/00.png .. 04.png and data/robot_toy.csv
    python data/make_robot_toy.py --out_dir /tmp/x  # same files under /tmp/x
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SUPERSAMPLE = 4  # draw at 4x and shrink: smooth edges without any antialiasing support in ImageDraw
CANVAS = SIZE * SUPERSAMPLE

CONCEPT = "robot_toy"
IDENTIFIER = "sks"
CLASS_NOUN = "robot toy"
INSTANCE_WORD = f"{IDENTIFIER} {CLASS_NOUN}"
CSV_COLUMNS = ("image_path", "prompt", "target_prompt", "base_prompt", "instance_word")

# the toy's own colours: the same in every picture, because they are what makes it *this* robot
HEAD = (170, 178, 190)
BODY = (40, 90, 200)
CHEST_LIGHT = (250, 200, 40)
ARM = (240, 120, 30)
LEG = (70, 70, 80)
EYE = (40, 230, 240)
ANTENNA_BALL = (230, 40, 40)
OUTLINE = (25, 25, 30)

# one row per picture: where the toy stands, how big, its pose, and the scene named in the prompt
SCENES = (
    dict(background="wooden_table", where="on a wooden table", cx=0.50, ground=0.86, scale=1.00,
         arms=(20, -20), lean=0),
    dict(background="grass", where="on the grass", cx=0.36, ground=0.90, scale=0.80,
         arms=(150, -40), lean=-6),
    dict(background="beach", where="on a sandy beach", cx=0.62, ground=0.84, scale=0.70,
         arms=(90, -90), lean=8),
    dict(background="snow", where="in the snow", cx=0.45, ground=0.95, scale=1.15,
         arms=(-10, -150), lean=4),
    dict(background="bookshelf", where="in front of a bookshelf", cx=0.58, ground=0.80, scale=0.60,
         arms=(60, 30), lean=-10),
)


def px(fraction: float) -> int:
    """A canvas coordinate from a fraction of the picture size."""
    return round(fraction * CANVAS)


def draw_wooden_table(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle([0, 0, CANVAS, px(0.62)], fill=(235, 225, 205))  # wall
    draw.rectangle([0, px(0.62), CANVAS, CANVAS], fill=(150, 95, 50))  # table top
    for row in range(5):  # wood grain
        y = px(0.68 + row * 0.065)
        draw.line([0, y, CANVAS, y + px(0.02)], fill=(120, 72, 35), width=SUPERSAMPLE * 2)


def draw_grass(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle([0, 0, CANVAS, px(0.65)], fill=(140, 200, 245))  # sky
    draw.ellipse([px(0.75), px(0.06), px(0.93), px(0.24)], fill=(255, 225, 80))  # sun
    draw.rectangle([0, px(0.65), CANVAS, CANVAS], fill=(70, 160, 60))
    for blade in range(14):
        x = px(0.04 + blade * 0.07)
        draw.line([x, px(0.98), x + px(0.02), px(0.90)], fill=(40, 120, 40), width=SUPERSAMPLE * 2)


def draw_beach(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle([0, 0, CANVAS, px(0.45)], fill=(120, 185, 240))  # sky
    draw.rectangle([0, px(0.45), CANVAS, px(0.62)], fill=(30, 110, 170))  # sea
    draw.rectangle([0, px(0.62), CANVAS, CANVAS], fill=(235, 210, 150))  # sand
    draw.ellipse([px(0.08), px(0.70), px(0.22), px(0.78)], fill=(250, 245, 235))  # a shell


def draw_snow(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle([0, 0, CANVAS, px(0.55)], fill=(200, 210, 225))  # overcast sky
    draw.rectangle([0, px(0.55), CANVAS, CANVAS], fill=(248, 250, 255))
    for flake in range(18):  # fixed snowflake grid, no randomness
        x = px((flake * 0.37) % 1.0)
        y = px(0.04 + (flake * 0.23) % 0.5)
        draw.ellipse([x, y, x + px(0.025), y + px(0.025)], fill=(255, 255, 255))


def draw_bookshelf(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle([0, 0, CANVAS, CANVAS], fill=(110, 70, 40))  # shelf wood
    book_colours = ((180, 40, 50), (40, 120, 70), (220, 180, 60), (60, 80, 160), (130, 60, 140))
    for shelf, top in enumerate((0.05, 0.40)):
        x = 0.03
        for book in range(9):
            width = 0.07 + 0.03 * ((book + shelf) % 3)
            draw.rectangle([px(x), px(top + 0.04 * (book % 2)), px(x + width), px(top + 0.30)],
                           fill=book_colours[(book + shelf) % len(book_colours)])
            x += width + 0.015
        draw.rectangle([0, px(top + 0.30), CANVAS, px(top + 0.34)], fill=(80, 50, 25))  # the board
    draw.rectangle([0, px(0.74), CANVAS, CANVAS], fill=(190, 160, 120))  # the desk in front


BACKGROUNDS = {
    "wooden_table": draw_wooden_table,
    "grass": draw_grass,
    "beach": draw_beach,
    "snow": draw_snow,
    "bookshelf": draw_bookshelf,
}


def rotate(point, centre, degrees):
    """``point`` turned about ``centre``; angles are clockwise on screen (y points down)."""
    angle = math.radians(degrees)
    dx, dy = point[0] - centre[0], point[1] - centre[1]
    return (centre[0] + dx * math.cos(angle) - dy * math.sin(angle),
            centre[1] + dx * math.sin(angle) + dy * math.cos(angle))


def limb(draw, shoulder, length, thickness, degrees, fill):
    """A rectangle hanging down from ``shoulder``, swung by ``degrees`` (0 = straight down)."""
    x, y = shoulder
    corners = [(x - thickness / 2, y), (x + thickness / 2, y),
               (x + thickness / 2, y + length), (x - thickness / 2, y + length)]
    draw.polygon([rotate(c, shoulder, degrees) for c in corners], fill=fill, outline=OUTLINE)
    hand = rotate((x, y + length), shoulder, degrees)
    r = thickness * 0.6
    draw.ellipse([hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r], fill=HEAD, outline=OUTLINE)


def draw_robot(draw, cx: float, ground: float, scale: float, arms, lean: float) -> None:
    """The toy, feet on ``ground`` (fraction of height), ``scale`` 1.0 = about 70% of the picture tall."""
    unit = CANVAS * 0.07 * scale  # every part is a multiple of this, so the toy keeps its proportions
    x = cx * CANVAS
    feet = ground * CANVAS
    # legs and feet
    leg_top = feet - 3 * unit
    for side in (-1, 1):
        lx = x + side * 0.9 * unit
        draw.rectangle([lx - 0.45 * unit, leg_top, lx + 0.45 * unit, feet - 0.4 * unit], fill=LEG, outline=OUTLINE)
        draw.rectangle([lx - 0.8 * unit, feet - 0.5 * unit, lx + 0.8 * unit, feet], fill=LEG, outline=OUTLINE)
    # body with a chest light; the lean shifts the upper body sideways
    shift = lean / 10 * unit
    body_top = leg_top - 3.6 * unit
    bx = x + shift
    draw.rectangle([bx - 2 * unit, body_top, bx + 2 * unit, leg_top + 0.2 * unit], fill=BODY, outline=OUTLINE)
    draw.ellipse([bx - 0.6 * unit, body_top + 1.0 * unit, bx + 0.6 * unit, body_top + 2.2 * unit],
                 fill=CHEST_LIGHT, outline=OUTLINE)
    # arms from the shoulders: positive angles swing the left arm outwards, negative ones the right arm
    left_angle, right_angle = arms
    limb(draw, (bx - 2.3 * unit, body_top + 0.5 * unit), 2.8 * unit, 0.8 * unit, left_angle, ARM)
    limb(draw, (bx + 2.3 * unit, body_top + 0.5 * unit), 2.8 * unit, 0.8 * unit, right_angle, ARM)
    # boxy head with eyes, mouth and antenna
    head_top = body_top - 3.0 * unit
    hx = bx + shift * 0.5
    draw.rectangle([hx - 1.6 * unit, head_top, hx + 1.6 * unit, body_top - 0.2 * unit], fill=HEAD, outline=OUTLINE)
    for side in (-1, 1):
        ex = hx + side * 0.7 * unit
        draw.ellipse([ex - 0.4 * unit, head_top + 0.7 * unit, ex + 0.4 * unit, head_top + 1.5 * unit],
                     fill=EYE, outline=OUTLINE)
    draw.rectangle([hx - 0.8 * unit, head_top + 2.0 * unit, hx + 0.8 * unit, head_top + 2.3 * unit], fill=OUTLINE)
    draw.line([hx, head_top, hx, head_top - 1.2 * unit], fill=OUTLINE, width=max(1, round(0.2 * unit)))
    draw.ellipse([hx - 0.35 * unit, head_top - 1.6 * unit, hx + 0.35 * unit, head_top - 0.9 * unit],
                 fill=ANTENNA_BALL, outline=OUTLINE)


def draw_scene(scene: dict) -> Image.Image:
    image = Image.new("RGB", (CANVAS, CANVAS))
    draw = ImageDraw.Draw(image)
    BACKGROUNDS[scene["background"]](draw)
    draw_robot(draw, scene["cx"], scene["ground"], scene["scale"], scene["arms"], scene["lean"])
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def csv_row(index: int, scene: dict) -> dict:
    return {
        "image_path": f"{CONCEPT}/{index:02d}.png",
        "prompt": f"a photo of {INSTANCE_WORD} {scene['where']}",
        "target_prompt": f"a photo of {INSTANCE_WORD}",
        "base_prompt": f"a photo of a {CLASS_NOUN} {scene['where']}",
        "instance_word": INSTANCE_WORD,
    }


def write_concept(out_dir: Path) -> None:
    image_dir = out_dir / CONCEPT
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, scene in enumerate(SCENES):
        row = csv_row(index, scene)
        draw_scene(scene).save(out_dir / row["image_path"], optimize=True)
        rows.append(row)
    # "\n" line ends on every platform, so the CSV is byte-identical wherever it is written
    with open(out_dir / f"{CONCEPT}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="Folder that receives robot_toy/ and robot_toy.csv (default: this script's folder).")
    args = parser.parse_args(argv)
    write_concept(args.out_dir)
    print(f"wrote {len(SCENES)} images and {CONCEPT}.csv under {args.out_dir}")


if __name__ == "__main__":
    main()
