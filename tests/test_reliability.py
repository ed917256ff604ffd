"""Reliability: exact resume for every accumulation / dataset length / kill point, the final-checkpoint and
rotation edge cases, non-finite losses, reused output folders, image modes, file modes, warnings and log noise."""

from __future__ import annotations

import ast
import csv
import os
import re
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATA, REPO_ROOT, checkpoint_names, logged_messages, lora_tensors, stage1, stage2
from PIL import Image

from utils.checks import BadInput, RunFailed
from utils.data import open_rgb

WEIGHTS = "pytorch_lora_weights.safetensors"


def concept_csv(folder: Path, rows: int) -> Path:
    """data/robot_toy.csv cut to its first ``rows`` rows, with absolute image paths."""
    folder.mkdir(parents=True, exist_ok=True)
    records = list(csv.DictReader(open(DATA / "robot_toy.csv")))[:rows]
    path = folder / f"toy{rows}.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows([dict(r, image_path=str(DATA / r["image_path"])) for r in records])
    return path


def train(stage: int, model, out, csv_path: Path, *flags, steps: int):
    common = ["--random_flip", "--learning_rate", "1e-2", *map(str, flags)]
    if stage == 1:
        return stage1(model, out, "--data_path", csv_path.parent, "--csv_name", csv_path.name, *common, steps=steps,
                      data=None)
    return stage2(model, out, "--extractor_mode", "base", *common, steps=steps, csv=csv_path)


def lora_dir(stage: int, out: Path, csv_path: Path) -> Path:
    return out if stage == 1 else out / csv_path.stem


# ----------------------------------------------------------------------------------------------- exact resume
# 5 images leave a partial last batch for accumulation 2 and 4 (the hard case) and none for 1; 4 images with
# accumulation 2 is the even case (4 with 1 or 4 were dropped to keep the suite under 5 minutes: they add no new
# boundary)
@pytest.mark.parametrize("images, accumulation", [(5, 1), (5, 2), (5, 4), (4, 2)])
@pytest.mark.parametrize("stage", [1, 2])
def test_resume_is_exact_for_every_accumulation_length_and_kill_point(stage, images, accumulation, tiny_sd3_path,
                                                                      tmp_path):
    """One uninterrupted run with a checkpoint after every step; then, for a kill just before and just after the
    first epoch boundary, a copy of the run holding only that checkpoint is resumed with "latest": each ends with
    the uninterrupted run's LoRA, bit for bit."""
    csv_path = concept_csv(tmp_path / "data", images)
    updates_per_epoch = -(-images // accumulation)
    steps = 2 * updates_per_epoch + 1  # into the third epoch
    flags = ["--gradient_accumulation_steps", accumulation, "--checkpointing_steps", 1]
    straight = tmp_path / "straight"
    train(stage, tiny_sd3_path, straight, csv_path, *flags, steps=steps)
    expected = lora_tensors(lora_dir(stage, straight, csv_path))
    kill_points = sorted({max(1, updates_per_epoch - 1), updates_per_epoch + 1})
    for kill_after in kill_points:
        killed = tmp_path / f"killed_at_{kill_after}"
        source, target = lora_dir(stage, straight, csv_path), lora_dir(stage, killed, csv_path)
        shutil.copytree(source / f"checkpoint-{kill_after}", target / f"checkpoint-{kill_after}")
        resumed = train(stage, tiny_sd3_path, killed, csv_path, *flags, "--resume_from_checkpoint", "latest",
                        steps=steps)
        assert [h["step"] for h in resumed.history] == list(range(kill_after + 1, steps + 1))
        got = lora_tensors(target)
        unequal = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not unequal, f"resumed after step {kill_after} differs in {len(unequal)} tensors"


# ----------------------------------------------------------------------------------------------- edge cases
def test_resume_from_the_final_checkpoint_trains_nothing_and_rewrites_the_outputs(tiny_sd3_path, tmp_path):
    out = tmp_path / "run"
    stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", steps=4)
    before = lora_tensors(out)
    (out / WEIGHTS).unlink()  # the final files were lost; the last checkpoint is the final state
    again = stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=4)
    assert again.step == 4 and again.history == []
    after = lora_tensors(out)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_kill_while_saving_keeps_the_last_complete_checkpoint(tiny_sd3_path, tmp_path, monkeypatch):
    """With --checkpoints_total_limit 1 the old checkpoint goes only once the new one is complete: a run killed
    while writing checkpoint-6 still has checkpoint-4, and "latest" resumes from it to the same end."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    flags = ["--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
    real_save = Accelerator.save_state

    def killed_while_saving(self, output_dir=None, **kwargs):
        if "checkpoint-6" in str(output_dir):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
            raise KeyboardInterrupt("killed while saving")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        stage1(tiny_sd3_path, out, *flags, steps=6)
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6.tmp"]  # the complete one, the half one
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    resumed = stage1(tiny_sd3_path, out, *flags, "--resume_from_checkpoint", "latest", steps=6)
    assert [h["step"] for h in resumed.history] == [5, 6]
    assert checkpoint_names(out) == ["checkpoint-6"] and not (out / "checkpoint-6.tmp").exists()


def test_latest_without_a_checkpoint_says_so(tiny_sd3_path, tmp_path):
    with pytest.warns(UserWarning, match="no complete checkpoint in .*starting from step 0"):
        result = stage1(tiny_sd3_path, tmp_path / "fresh", "--resume_from_checkpoint", "latest", steps=1)
    assert result.step == 1


# ----------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("flag, value", [("--learning_rate", "inf"), ("--learning_rate", "0"), ("--eta", "nan"),
                                         ("--eta", "-1"), ("--max_train_steps", "0"), ("--rank", "0"),
                                         ("--fix_lambda", "nan")])
def test_bad_numbers_are_rejected_up_front(flag, value, tiny_sd35_path, tmp_path):
    with pytest.raises(BadInput) as err:
        stage2(tiny_sd35_path, tmp_path / "out", "--extractor_mode", "base", flag, value)
    assert flag in str(err.value)
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_stops_before_touching_earlier_outputs(tiny_sd35_path, tmp_path):
    """A finished 4-step run, resumed from its checkpoint-2 with a lambda so large that the PureCC term overflows:
    the run stops at step 3 with every loss term and the batch's image paths in one message; the final LoRA and
    both checkpoints of the earlier run are byte-identical afterwards."""
    out = tmp_path / "out"
    flags = ["--extractor_mode", "base", "--lambda_mode", "fixed", "--checkpointing_steps", "2"]
    stage2(tiny_sd35_path, out, *flags, steps=4)
    folder = out / "robot_toy"
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.safetensors")}
    with pytest.raises(RunFailed) as err:
        stage2(tiny_sd35_path, out, *flags, "--fix_lambda", "1e30", "--resume_from_checkpoint", "checkpoint-2",
               steps=4)
    message = str(err.value)
    assert "non-finite loss at step 3" in message and "pri_loss=inf" in message and "diff_loss=" in message
    assert "robot_toy/0" in message and ".png" in message  # the batch's image
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*.safetensors")} == before
    assert checkpoint_names(folder) == ["checkpoint-2", "checkpoint-4"]


def test_non_finite_exits_with_status_3_and_one_line(tiny_sd35_path, tmp_path, capsys, monkeypatch):
    import train_stage2_v2_sd3

    from utils.checks import exit_on_error

    monkeypatch.setattr("sys.argv", ["train_stage2_v2_sd3.py", "--pretrained_model_name_or_path", str(tiny_sd35_path),
                                     "--data_path", str(DATA), "--csv_name", "robot_toy.csv", "--output_dir",
                                     str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "2",
                                     "--report_to", "none", "--extractor_mode", "base", "--lambda_mode", "fixed",
                                     "--fix_lambda", "1e30"])
    with pytest.raises(SystemExit) as exit_info:
        exit_on_error(train_stage2_v2_sd3.main)
    assert exit_info.value.code == 3
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "non-finite loss at step 1" in lines[0], captured
    assert not (tmp_path / "out" / "robot_toy" / WEIGHTS).exists()


# ----------------------------------------------------------------------------------------------- output folders
def test_reused_output_folder_is_refused_then_overwritten_or_resumed(tiny_sd3_path, tmp_path):
    out = tmp_path / "run"
    stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", steps=4)
    finished = (out / WEIGHTS).read_bytes()
    with pytest.raises(BadInput) as err:  # the same command again
        stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", steps=6)
    assert f"--output_dir {out} already holds a run" in str(err.value) and "--overwrite_output_dir" in str(err.value)
    assert (out / WEIGHTS).read_bytes() == finished

    with pytest.raises(BadInput) as err:  # resuming the old run with other settings
        stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
               "--resume_from_checkpoint", "latest", steps=4)
    assert "gradient_accumulation_steps=1 there, 2 now" in str(err.value)
    with pytest.raises(BadInput) as err:  # or past the old run's step limit
        stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=6)
    assert "max_train_steps=4 there, 6 now" in str(err.value)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"] and (out / WEIGHTS).read_bytes() == finished

    fresh = stage1(tiny_sd3_path, out, "--checkpointing_steps", "3", "--overwrite_output_dir", steps=3)
    assert fresh.step == 3 and checkpoint_names(out) == ["checkpoint-3"]  # the old run's checkpoints are gone


def test_stage2_overwrite_clears_only_its_concept_folder(tiny_sd35_path, extractors, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(extractors[0], out / "base_ckpt" / "robot_toy")
    stage2(tiny_sd35_path, out, "--checkpointing_steps", "1", steps=1)
    stage2(tiny_sd35_path, out, "--overwrite_output_dir", steps=1)
    assert (out / "base_ckpt" / "robot_toy" / WEIGHTS).is_file()  # the extractor beside it stays
    assert checkpoint_names(out / "robot_toy") == []


def test_data_change_is_a_resume_mismatch(tiny_sd3_path, tmp_path):
    csv_path = concept_csv(tmp_path / "data", 5)
    stage1(tiny_sd3_path, tmp_path / "run", "--data_path", csv_path.parent, "--csv_name", csv_path.name,
           "--checkpointing_steps", "1", steps=1, data=None)
    rows = csv_path.read_text().replace("wooden table", "glass table")
    csv_path.write_text(rows)
    with pytest.raises(BadInput, match="data="):
        stage1(tiny_sd3_path, tmp_path / "run", "--data_path", csv_path.parent, "--csv_name", csv_path.name,
               "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest", steps=1, data=None)


# ----------------------------------------------------------------------------------------------- image modes
GREYS = [0, 1, 128, 254, 255]


def _grey_row(mode_values, mode):
    return Image.fromarray(np.array([mode_values], dtype={"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]),
                           mode=mode if mode != "I;16" else None)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "1", "L", "LA", "P", "PA_transparent", "CMYK", "RGBA", "YCbCr"])
def test_every_pil_mode_opens_as_the_right_rgb(mode, tmp_path):
    path = tmp_path / "image.png"
    if mode == "I;16":  # a 16-bit greyscale PNG: 0..65535
        Image.fromarray(np.array([[v * 257 for v in GREYS]], dtype=np.uint16)).save(path)
        expected = [[(v, v, v) for v in GREYS]]
    elif mode == "I":
        path = tmp_path / "image.tif"
        Image.fromarray(np.array([[v * 257 for v in GREYS]], dtype=np.int32), mode="I").save(path)
        expected = [[(v, v, v) for v in GREYS]]
    elif mode == "F":
        path = tmp_path / "image.tif"
        Image.fromarray(np.array([[v / 255 for v in GREYS]], dtype=np.float32), mode="F").save(path)
        expected = [[(v, v, v) for v in GREYS]]
    elif mode == "1":
        Image.fromarray(np.array([[0, 255, 0, 255, 255]], dtype=np.uint8)).convert("1").save(path)
        expected = [[(v, v, v) for v in (0, 255, 0, 255, 255)]]
    elif mode == "L":
        Image.fromarray(np.array([GREYS], dtype=np.uint8), mode="L").save(path)
        expected = [[(v, v, v) for v in GREYS]]
    elif mode == "LA":  # grey 0 opaque, grey 0 fully transparent (-> white), grey 100 half transparent
        Image.fromarray(np.array([[[0, 255], [0, 0], [100, 128]]], dtype=np.uint8), mode="LA").save(path)
        half = round(100 * 128 / 255 + 255 * (1 - 128 / 255))
        expected = [[(0, 0, 0), (255, 255, 255), (half, half, half)]]
    elif mode == "P":
        image = Image.new("P", (2, 1))
        image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
        image.putpixel((1, 0), 1)
        image.save(path)
        expected = [[(10, 20, 30), (200, 100, 50)]]
    elif mode == "PA_transparent":  # palette image with a transparent index: its hidden colour must not show
        image = Image.new("P", (2, 1))
        image.putpalette([10, 20, 30, 0, 0, 0] + [0] * 762)
        image.putpixel((1, 0), 1)
        image.save(path, transparency=1)
        expected = [[(10, 20, 30), (255, 255, 255)]]
    elif mode == "CMYK":
        path = tmp_path / "image.jpg"
        Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path, quality=100)  # pure red in CMYK
        expected = [[(255, 0, 0)] * 4] * 4
    elif mode == "RGBA":
        Image.fromarray(np.array([[[200, 10, 10, 255], [0, 0, 0, 0]]], dtype=np.uint8), mode="RGBA").save(path)
        expected = [[(200, 10, 10), (255, 255, 255)]]
    else:  # YCbCr: what some JPEG pipelines hand over; PIL's conversion is exact for grey
        path = tmp_path / "image.jpg"
        Image.new("RGB", (8, 8), (128, 128, 128)).convert("YCbCr").save(path, quality=100)
        expected = [[(128, 128, 128)] * 8] * 8
    got = np.asarray(open_rgb(path)).astype(int)
    assert open_rgb(path).mode == "RGB"
    assert np.abs(got - np.array(expected)).max() <= (2 if mode in ("CMYK", "YCbCr") else 1), (got, expected)


# ----------------------------------------------------------------------------------------------- files, warnings, noise
def test_saved_loras_and_checkpoints_are_readable_by_the_group(tiny_sd3_path, tmp_path):
    old = os.umask(0o022)
    try:
        stage1(tiny_sd3_path, tmp_path / "run", "--checkpointing_steps", "1", steps=1)
    finally:
        os.umask(old)
    files = [*(tmp_path / "run").glob("*.safetensors"), *(tmp_path / "run" / "checkpoint-1").glob("*.safetensors")]
    assert len(files) == 4
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o644 for path in files), \
        {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in files}


def test_extractor_from_an_unfinished_stage1_is_named(tiny_sd35_path, extractors, tmp_path):
    out = tmp_path / "output"
    shutil.copytree(extractors[0], out / "base_ckpt" / "robot_toy" / "checkpoint-3")
    with pytest.warns(UserWarning, match=r"no final stage-1 LoRA: using its newest checkpoint, checkpoint-3 \(step 3\)"):
        stage2(tiny_sd35_path, out, steps=1)


def test_csv_rows_that_cannot_teach_the_concept_are_named(tmp_path):
    from utils.data import read_concept_csv

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    header = "image_path,prompt,target_prompt,base_prompt,instance_word\n"
    (tmp_path / "c.csv").write_text(header + "a.png,a photo of sks dog,a sks dog,a photo of a dog,sks dog\n"
                                    "a.png,a photo of a dog,a sks dog,a photo of a cat,sks dog\n"
                                    "a.png,a photo of [v],a sks dog,a photo of [v],sks dog\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_concept_csv(tmp_path, "c.csv")
    messages = [str(w.message) for w in caught]
    assert any("data row(s) 2 names neither its instance_word nor [v]" in m for m in messages), messages
    assert any("data row(s) 3 have prompt == base_prompt" in m for m in messages), messages


def test_no_known_harmless_noise_but_real_warnings_stay(tiny_sd35_path, extractors, tmp_path, capsys):
    """Training prints none of the libraries' known harmless messages, and a real one still shows; --help prints only
    the help. (A new interpreter's import-time noise is checked where the scripts run as a user runs them:
    test_run_concept.py's bad-flag test, whose input check imports both training scripts.)"""
    import logging

    import train_stage1_sd3

    with logged_messages("diffusers.models.modeling_utils") as seen:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stage2(tiny_sd35_path, tmp_path / "out", "--extractor_lora", extractors[0], steps=1)
        assert not [w for w in caught if "peft_config" in str(w.message)]
        assert not [m for m in seen if "should be kept in float32: []" in m], seen
        logging.getLogger("diffusers.models.modeling_utils").warning("should be kept in float32: ['norm'].")
        assert any("['norm']" in m for m in seen), seen  # a real one still shows
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train_stage1_sd3.parse_args(["--help"])
    printed = capsys.readouterr()
    assert stop.value.code == 0 and printed.out.startswith("usage:") and printed.err == "", printed.err


# the Python scripts a user runs: the training scripts, infer.py, eval.py and those of scripts/
USER_SCRIPTS = [*REPO_ROOT.glob("*.py"), *(REPO_ROOT / "scripts").glob("*.py")]


def test_every_script_imports_utils_before_the_model_libraries():
    """Importing utils installs the filters of known-harmless library messages (utils/quiet.py). A library that
    prints while it is imported, before they exist, reaches the user (transformers' torchvision notice did, through
    infer.py). So every script a user runs imports the project (utils, or a script that imports it first) before
    diffusers, transformers or peft."""
    project = {"utils", *(path.stem for path in USER_SCRIPTS)}
    late = []
    for path in USER_SCRIPTS:
        roots = []
        for node in ast.parse(path.read_text()).body:  # the module's own top-level imports, in order
            if isinstance(node, ast.Import):
                roots += [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.append(node.module.split(".")[0])
        libraries = [i for i, root in enumerate(roots) if root in ("diffusers", "transformers", "peft")]
        ours = [i for i, root in enumerate(roots) if root in project]
        if libraries and (not ours or ours[0] > libraries[0]):
            late.append(path.name)
    assert not late, late


def test_help_prints_the_example_commands_as_written():
    """--help prints each script's docstring: its example commands must keep their continuation backslashes and line
    breaks (a docstring that is not raw turns "\\" + newline into nothing, joining the lines with runs of spaces)."""
    joined = []
    for path in USER_SCRIPTS:
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        joined += [f"{path.name}: {line.strip()[:60]}" for line in doc.splitlines() if re.search(r"\S {4,}--", line)]
    assert not joined, joined


def test_the_project_stands_alone():
    """Documentation and code point to the project's own docs/, never to files a user does not have (nothing
    outside the repository, no notes that were never part of it)."""
    assert (REPO_ROOT / "docs" / "method.md").is_file()
    offenders = []
    for path in [*REPO_ROOT.glob("*.py"), *REPO_ROOT.glob("*.md"), *(REPO_ROOT / "utils").glob("*.py"),
                 *(REPO_ROOT / "scripts").glob("*"), *(REPO_ROOT / "docs").glob("*.md"),
                 *(REPO_ROOT / "data").glob("*.py")]:
        if not path.is_file():  # scripts/__pycache__, made when a test imports a script
            continue
        text = path.read_text(errors="ignore")
        for line in text.splitlines():
            listing_docs = line.startswith("docs/")  # the README's layout lists docs/ by file name
            climbs_out = re.search(r"\.\./[A-Za-z]", line)  # a path outside the repository
            if "pitfalls.md" in line or climbs_out or (
                    "method.md" in line and "docs/method.md" not in line and path.name != "method.md"
                    and not listing_docs):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {line.strip()}")
    assert not offenders, offenders
