"""eval.py: the paper's metrics on generated images with tiny offline backbones; metric maths by hand; the base
model against itself gives zero deltas; a zero LoRA gives zero drift; every output is written; bad inputs are one
line before anything is generated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import DATA, stage1

import eval as evaluate
from utils.checks import BadInput
from utils.lora import make_lora_config, save_lora_both_formats, transformer_target_modules
from utils.metrics import best_match_iou, mean_cosine, paired_cosine, seg_consistency


# ----------------------------------------------------------------------------------------------- maths by hand
def test_mean_and_paired_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [3.0, 0.0]])
    # cos(a0,b0)=1/sqrt2, cos(a0,b1)=1, cos(a1,b0)=1/sqrt2, cos(a1,b1)=0
    assert mean_cosine(a, b) == pytest.approx((2 / 2 ** 0.5 + 1) / 4)
    assert paired_cosine(a, b).tolist() == pytest.approx([1 / 2 ** 0.5, 0.0])


def test_seg_consistency_on_hand_made_masks():
    def box(x0, y0, x1, y1):
        mask = np.zeros((4, 4), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return mask

    left, right, top = box(0, 0, 2, 4), box(2, 0, 4, 4), box(0, 0, 4, 2)
    assert seg_consistency([left, right], [left, right]) == 100.0
    # left vs top: IoU 4/12; right vs top: 4/12; top's best is 4/12 either way
    assert best_match_iou([left, right], [top]) == pytest.approx(1 / 3)
    assert seg_consistency([left, right], [top]) == pytest.approx(100 / 3)
    # symmetric: one shared mask and one extra lowers both directions
    assert seg_consistency([left], [left, top]) == pytest.approx(100 * 0.5 * (1 + (1 + 1 / 3) / 2))
    assert seg_consistency([], []) == 100.0 and seg_consistency([left], []) == 0.0


# ----------------------------------------------------------------------------------------------- the driver
@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    from utils.tiny_backbones import build_all

    return build_all(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="module")
def loras(tiny_sd35_path, tmp_path_factory):
    """A trained stage-1 LoRA and an untrained one (gaussian A, zero B: exactly the base model)."""
    root = tmp_path_factory.mktemp("eval_loras")
    result = stage1(tiny_sd35_path, root / "trained", "--learning_rate", "1e-2", steps=3)
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(result.transformer, adapter_name="default")
    zero = {k: (v * 0 if "lora_B" in k else v).detach().clone() for k, v in state.items()}
    save_lora_both_formats(root / "zero", zero, make_lora_config(4, transformer_target_modules(None, None)))
    return root / "trained", root / "zero"


def eval_argv(model, out, prompts_file, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--data_path", str(DATA), "--csv_name", "robot_toy.csv",
            "--resolution", "64", "--num_inference_steps", "2", "--num_images_per_prompt", "2", "--prompts_file",
            str(prompts_file), "--sigmas", "0.5", "--output_dir", str(out), *map(str, extra)]


@pytest.fixture(scope="module")
def evaluated(tiny_sd35_path, loras, backbones, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prompts = root / "pairs.txt"
    # the first pair's complete prompt is, for the base model, its base prompt: the base scored against itself
    prompts.write_text("a photo of [v] | a photo of sks robot toy\na photo of [v] on the moon | a photo of a [c] on the "
                       "moon\n")
    argv = eval_argv(tiny_sd35_path, root / "out", prompts, "--lora", loras[0], "--lora", loras[1], "--clip_model",
                     backbones["clip"], "--dino_model", backbones["dino"], "--pickscore_model", backbones["clip"],
                     "--sam_model", backbones["sam"], "--sam_points_per_side", "4", "--sam_pred_iou_thresh", "0",
                     "--sam_stability_thresh", "0")
    results = evaluate.main(argv)
    return dict(root=root, out=root / "out", argv=argv, results=results, loras=loras, prompts=prompts)


def test_every_output_is_written_with_the_named_keys(evaluated):
    out, trained, zero = evaluated["out"], *evaluated["loras"]
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["models"]) == ["base", "trained", "zero"]
    for values in saved["models"].values():
        assert set(values) == {"clip_i", "dino", "clip_t_base", "delta_clip_t_base", "hps", "delta_hps", "pickscore",
                               "delta_pickscore", "seg_cons", "velocity_drift", "concept_loss"}
        assert values["hps"] is None and values["delta_hps"] is None  # no --hps_model: skipped, and said so
        assert all(isinstance(values[k], float) for k in values if k not in ("hps", "delta_hps"))
    assert saved["backbones"]["hps_model"].startswith("not given")
    assert saved["prompts"][1] == {"complete": "a photo of [v] on the moon", "base": "a photo of a robot toy on the moon"}
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| model | CLIP-I | DINO | CLIP-T(base) | ΔCLIP-T(base) | HPSv2.1 | ΔHPSv2.1")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["base", "trained", "zero"]
    for folder in ("original", "base", "trained", "zero"):
        assert sorted(p.name for p in (out / "images" / folder).iterdir()) == \
            ["p000_s0.png", "p000_s1.png", "p001_s0.png", "p001_s1.png"]
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["p000.png", "p001.png"]


def test_base_against_itself_and_a_zero_lora_change_nothing(evaluated):
    out = evaluated["out"]
    # prompt 0: the base model's complete prompt is its base prompt, same seeds: the very same images
    for j in (0, 1):
        assert np.array_equal(np.asarray(evaluate.Image.open(out / "images" / "base" / f"p000_s{j}.png")),
                              np.asarray(evaluate.Image.open(out / "images" / "original" / f"p000_s{j}.png")))
    base, zero, trained = (evaluated["results"][name] for name in ("base", "zero", "trained"))
    assert base["velocity_drift"] == 0.0 and zero["velocity_drift"] == 0.0
    assert trained["velocity_drift"] > 1e-9
    assert zero["concept_loss"] == pytest.approx(base["concept_loss"], rel=1e-6)
    for key in ("clip_i", "dino", "clip_t_base", "pickscore"):
        assert zero[key] == pytest.approx(base[key], abs=1e-6), key


def test_skip_generation_recomputes_the_same_metrics(evaluated, tiny_sd35_path):
    again = evaluate.main(evaluated["argv"] + ["--skip_generation"])
    for name, values in evaluated["results"].items():
        for key, value in values.items():
            assert again[name][key] == (pytest.approx(value, rel=1e-6) if value is not None else None), (name, key)


def test_base_against_itself_gives_zero_deltas(tiny_sd35_path, backbones, tmp_path):
    prompts = tmp_path / "pairs.txt"
    prompts.write_text("a photo of [v] | a photo of sks robot toy\n")
    results = evaluate.main(eval_argv(tiny_sd35_path, tmp_path / "out", prompts, "--clip_model", backbones["clip"],
                                      "--pickscore_model", backbones["clip"], "--sam_model", backbones["sam"],
                                      "--sam_points_per_side", "4", "--sam_pred_iou_thresh", "0",
                                      "--sam_stability_thresh", "0"))
    base = results["base"]
    assert base["delta_clip_t_base"] == 0.0 and base["delta_pickscore"] == 0.0 and base["seg_cons"] == 100.0


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case", ["missing backbone", "lora for another model", "empty prompts", "no [v]"])
def test_bad_input_is_one_line_before_generation(case, tiny_sd35_path, tiny_sd3_path, loras, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *_: pytest.fail("eval.py loaded a model first"))
    prompts = tmp_path / "pairs.txt"
    prompts.write_text("a photo of [v] | a photo of a [c]\n")
    extra, expected, model = [], [], tiny_sd35_path
    if case == "missing backbone":
        extra, expected = ["--clip_model", tmp_path / "no_clip"], ["--clip_model", "no_clip", "no such folder"]
    elif case == "lora for another model":
        extra, model, expected = ["--lora", loras[0]], tiny_sd3_path, ["--lora", "does not fit", "transformer key"]
    elif case == "empty prompts":
        prompts.write_text("# nothing here\n\n")
        expected = [str(prompts), "holds no prompt pairs"]
    else:
        prompts.write_text("a photo of a toy | a photo of a [c]\n")
        expected = [str(prompts), "line 1", "has no [v]"]
    with pytest.raises(BadInput) as err:
        evaluate.main(eval_argv(model, tmp_path / "out", prompts, *extra))
    assert all(text in str(err.value) for text in expected), str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
