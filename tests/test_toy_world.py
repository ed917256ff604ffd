"""The toy world's drawing, captions and exact evaluators (utils/toy_world.py): evaluators read every attribute of
every true render back, and the concept-fidelity / layout scores give their hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from utils import toy_world as world
from utils.data import read_concept_csv


def test_every_true_render_reads_back_exactly():
    scenes = world.all_scenes()
    assert len(scenes) == 6 * 5 * 4 * 5  # background x other colour x shape x position
    for scene in scenes:
        read = world.read_attributes(world.render(scene))
        assert read == {"background": scene.background, "color": scene.color, "shape": scene.shape,
                        "position": scene.position}, scene


def test_shapes_are_distinct_and_leave_the_frame_free():
    for position in world.POSITIONS:
        masks = {shape: world.shape_mask(shape, position) for shape in world.SHAPES}
        for a in world.SHAPES:
            assert not masks[a][0].any() and not masks[a][-1].any() and not masks[a][:, 0].any() \
                and not masks[a][:, -1].any()
            for b in world.SHAPES:
                if a < b:
                    iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                    assert iou < 0.6, (a, b, position, iou)


def test_empty_image_has_no_object():
    plain = world.render(world.Scene("green", "red", "square", "center"))
    plain[:] = world.COLORS["green"]
    assert world.read_attributes(plain) == {"background": "green", "color": None, "shape": None, "position": None}
    assert world.concept_fidelity(plain) == 0.0


def test_concept_fidelity_hand_values():
    truth = world.render(world.concept_scene("blue", "top right"))
    assert world.concept_fidelity(truth) == pytest.approx(1.0)
    # the stripes blurred to their mean colour: SSE == SST, fidelity 0
    mask = world.shape_mask(world.CONCEPT_SHAPE, "top right")
    blurred = truth.copy().astype(np.float64)
    blurred[mask] = truth[mask].astype(np.float64).mean(axis=0)
    assert world.concept_fidelity(blurred.round().astype(np.uint8)) == pytest.approx(0.0, abs=1e-3)
    # a plain red disc is further from the truth than the mean colour: clipped at 0
    red_disc = world.render(world.Scene("blue", "red", "circle", "top right"))
    assert world.concept_fidelity(red_disc) == 0.0
    # half the stripe error: with every object pixel moved halfway to the mean, SSE = SST / 4 -> 0.75
    half = truth.astype(np.float64)
    half[mask] = (truth[mask] + truth[mask].astype(np.float64).mean(axis=0)) / 2
    assert world.concept_fidelity(half, position="top right") == pytest.approx(0.75, abs=0.01)
    # the concept drawn at another position than asked: scored where it was asked for
    assert world.concept_fidelity(truth, position="bottom left") < 0.1


def test_background_iou_hand_values():
    a = world.render(world.Scene("green", "red", "square", "top left"))
    assert world.background_iou(a, a) == 1.0
    b = world.render(world.Scene("green", "red", "square", "bottom right"))
    square = world.shape_mask("square", "top left").sum()  # 10x10 = 100 pixels, disjoint from the other
    expected = (32 * 32 - 2 * square) / (32 * 32)
    assert world.background_iou(a, b) == pytest.approx(expected)



def test_concept_scores_hand_values():
    """Two concept images: a true render where asked (fidelity 1, context kept, same layout as the base image)
    and a plain red disc at another position than asked (fidelity 0, context not kept, half the object area
    moved)."""
    true = world.render(world.concept_scene("green", "top left"))
    base = world.render(world.Scene("green", "red", "circle", "top left"))
    moved = world.render(world.Scene("green", "red", "circle", "bottom right"))
    scores = world.concept_scores([true, moved], [base, base],
                                  [{"background": "green", "position": "top left"}] * 2)
    assert scores["fidelity"] == pytest.approx(0.5) and scores["learned"] == 0.5
    assert scores["context_kept"] == 0.5
    disc = world.shape_mask("circle", "top left").sum()
    free = world.SIZE ** 2 - disc
    assert scores["layout_iou"] == pytest.approx((1.0 + (free - disc) / (free + disc)) / 2)

def test_captions_parse_back_and_drop_parts():
    for scene in world.all_scenes()[::7]:
        text = world.caption(scene)
        assert world.parse_caption(text) == {"background": scene.background, "color": scene.color,
                                             "shape": scene.shape, "position": scene.position}
    scene = world.Scene("blue", "red", "circle", "top left")
    assert world.caption(scene) == "a red circle on sky, top left"
    assert world.caption(scene, {"shape"}) == "a red toy on sky, top left"
    assert world.caption(scene, {"color", "position"}) == "a circle on sky"
    concept = world.concept_scene("green", "center")
    assert world.caption(concept) == "a sks toy on grass, center"
    assert world.base_caption(concept) == "a toy on grass, center"


def test_every_caption_word_is_in_the_tiny_vocabulary():
    from utils.tiny_sd3 import _WORDS

    vocabulary = set(_WORDS)
    words = {word.strip(",") for text in world.pretraining_captions() for word in text.split()}
    words |= set(world.CONCEPT_WORD.split())
    assert words <= vocabulary, words - vocabulary
    assert "" in world.pretraining_captions()


def test_concept_csv_is_a_valid_project_csv(tmp_path):
    csv_path = world.write_concept(tmp_path / "sks_toy", tmp_path / "sks_toy.csv")
    rows = read_concept_csv(tmp_path, "sks_toy.csv")
    assert len(rows) == len(world.CONCEPT_SCENES)
    for row, (background, position) in zip(rows, world.CONCEPT_SCENES):
        scene = world.concept_scene(background, position)
        assert np.array_equal(np.asarray(Image.open(row.image_path).convert("RGB")), world.render(scene))
        assert row.prompt == world.caption(scene) and row.base_prompt == world.base_caption(scene)
        assert row.instance_word == world.CONCEPT_WORD and row.target_prompt == "a sks toy"
    assert csv_path.read_text().splitlines()[0] == "image_path,prompt,target_prompt,base_prompt,instance_word"
