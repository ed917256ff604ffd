"""utils/data.py (CSV reading and checks, instance folders, image files), utils/dataset.py (preprocessing, dataset,
class sub-batches) and the example concept."""

import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.data import CSV_COLUMNS, ConceptRow, folder_to_items, list_instance_images, read_concept_csv, rows_to_items
from utils.dataset import ConceptDataset, WithClassImages, collate_examples, load_image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
HEADER = ",".join(CSV_COLUMNS)
GOOD_ROW = "img.png,a photo of sks dog,a photo of sks dog,a photo of a dog,sks dog"


def _save_halves(path, size, left=(255, 0, 0), right=(0, 0, 255), **save_kwargs):
    """An image whose left half is ``left`` and right half ``right``: orientation is visible in the pixels."""
    width, height = size
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, width // 2, height))
    image.save(path, **save_kwargs)
    return path


def _gradient(path, size):
    """Distinct pixels everywhere (x, y and channel), so any crop offset or flip changes the tensor."""
    width, height = size
    x = np.arange(width)[None, :, None]
    y = np.arange(height)[:, None, None]
    array = np.concatenate([x * 255 // width + 0 * y, y * 255 // height + 0 * x, (x + y) % 256 + 0 * x * y], -1)
    Image.fromarray(array.astype(np.uint8), "RGB").save(path)
    return path


# ---------- the example concept ----------

def test_example_csv_is_well_formed():
    rows = read_concept_csv(DATA, "robot_toy.csv")  # runs every read_concept_csv check, images included
    assert 4 <= len(rows) <= 6
    for row in rows:
        assert row.instance_word in row.prompt
        assert row.instance_word in row.target_prompt
        assert "sks" not in row.base_prompt.split()
        with Image.open(row.image_path) as image:
            assert image.size == (128, 128) and image.mode == "RGB"
    assert len({row.prompt for row in rows}) == len(rows), "prompts should vary per row"
    total = sum(p.stat().st_size for p in (DATA / "robot_toy").glob("*.png"))
    assert total < 100_000


def test_drawing_script_is_deterministic_and_matches_the_stored_images(tmp_path):
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run([sys.executable, str(DATA / "make_robot_toy.py"), "--out_dir", str(out)],
                       check=True, capture_output=True)
        outputs.append({p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 6  # 5 PNGs + the CSV
    # the committed files are this script's output (pixels, since PNG bytes depend on the zlib build)
    for relative, data in outputs[0].items():
        stored = DATA / relative
        if relative.suffix == ".png":
            fresh = np.asarray(Image.open(tmp_path / "a" / relative))
            assert np.array_equal(fresh, np.asarray(Image.open(stored))), relative
        else:
            assert stored.read_bytes() == data


# ---------- load_image ----------

@pytest.mark.parametrize("size", [(96, 48), (40, 100), (64, 64)])
@pytest.mark.parametrize("center_crop", [True, False])
def test_load_image_shape_and_range(tmp_path, size, center_crop):
    path = _save_halves(tmp_path / "x.png", size, left=(0, 0, 0), right=(255, 255, 255))
    out = load_image(path, 32, center_crop=center_crop, flip=False, rng=random.Random(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min().item() == pytest.approx(-1.0, abs=0.02) and out.max().item() == pytest.approx(1.0, abs=0.02)


def test_load_image_center_crop_keeps_the_middle(tmp_path):
    # 96x32 -> no resize; the centre crop is columns 32..63, entirely inside the middle third (green)
    image = Image.new("RGB", (96, 32), (255, 0, 0))
    image.paste((0, 255, 0), (32, 0, 64, 32))
    image.save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png", 32, center_crop=True, flip=False, rng=None)
    assert torch.allclose(out[1], torch.ones(32, 32)) and torch.allclose(out[0], -torch.ones(32, 32))


def test_load_image_random_crop_follows_rng(tmp_path):
    path = _gradient(tmp_path / "g.png", (96, 32))
    crops = {tuple(load_image(path, 32, False, False, random.Random(seed))[0, 0, :1].tolist()) for seed in range(8)}
    assert len(crops) > 1  # different rngs, different offsets
    a = load_image(path, 32, False, False, random.Random(3))
    assert torch.equal(a, load_image(path, 32, False, False, random.Random(3)))
    with pytest.raises(ValueError, match="rng"):
        load_image(path, 32, center_crop=False, flip=False, rng=None)


def test_exif_rotated_jpeg_is_transposed(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = _save_halves(tmp_path / "r.jpg", (64, 32), exif=exif.tobytes(), quality=95)
    out = load_image(path, 32, center_crop=True, flip=False, rng=None)
    # stored 64x32 red|blue becomes 32x64 upright with red on top; the centre crop is red above blue.
    # Without the transpose the crop would be red left | blue right instead.
    assert out.shape == (3, 32, 32)
    assert out[0, 2, :].mean() > 0.8 and out[2, 2, :].mean() < -0.8  # top rows red
    assert out[2, 29, :].mean() > 0.8 and out[0, 29, :].mean() < -0.8  # bottom rows blue


def test_flip_is_a_true_mirror(tmp_path):
    path = _gradient(tmp_path / "g.png", (32, 32))
    plain = load_image(path, 32, center_crop=True, flip=False, rng=None)
    flipped = load_image(path, 32, center_crop=True, flip=True, rng=None)
    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain.flip(-1))


# ---------- ConceptDataset / collate ----------

def _dataset(tmp_path, **kwargs):
    paths = [_gradient(tmp_path / f"{i}.png", (48 + 8 * i, 32)) for i in range(3)]
    items = folder_to_items(paths, {"prompt": "a photo of sks dog", "base_prompt": "a photo of a dog"})
    return ConceptDataset(items, 32, **kwargs)


def test_dataset_is_reproducible_per_seed_epoch_index(tmp_path):
    first = _dataset(tmp_path, random_flip=True, seed=7)
    second = _dataset(tmp_path, random_flip=True, seed=7)
    second.set_epoch(2)
    for _ in range(3):  # iteration history must not matter
        second[1]
    second.set_epoch(0)
    for i in range(len(first)):
        assert torch.equal(first[i]["pixel_values"], second[i]["pixel_values"])


def test_dataset_augmentation_changes_across_epochs(tmp_path):
    dataset = _dataset(tmp_path, random_flip=True)
    per_epoch = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        per_epoch.append(torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))]))
    assert any(not torch.equal(per_epoch[0], other) for other in per_epoch[1:])
    # and across seeds
    other_seed = _dataset(tmp_path, random_flip=True, seed=1)
    assert not all(torch.equal(other_seed[i]["pixel_values"], per_epoch[0][i]) for i in range(len(dataset)))


def test_dataset_without_augmentation_is_fixed(tmp_path):
    dataset = _dataset(tmp_path, center_crop=True, random_flip=False)
    before = dataset[2]["pixel_values"]
    dataset.set_epoch(5)
    assert torch.equal(before, dataset[2]["pixel_values"])


def test_repeats_multiply_length_and_image_index_wraps(tmp_path):
    dataset = _dataset(tmp_path, center_crop=True, repeats=4)
    assert len(dataset) == 12
    assert [dataset[i]["image_index"] for i in range(len(dataset))] == [0, 1, 2] * 4
    assert torch.equal(dataset[1]["pixel_values"], dataset[7]["pixel_values"])  # same image, no augmentation
    with pytest.raises(IndexError):
        dataset[12]


def test_collate_examples(tmp_path):
    dataset = _dataset(tmp_path, center_crop=True, repeats=2)
    example = dataset[4]
    assert example["prompt"] == "a photo of sks dog" and example["base_prompt"] == "a photo of a dog"
    assert example["image_path"] == str(dataset.items[1]["image_path"])  # as text: it names the image in messages
    batch = collate_examples([dataset[i] for i in (0, 4, 5)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].is_contiguous()
    assert batch["image_index"].dtype == torch.long and batch["image_index"].tolist() == [0, 1, 2]
    assert batch["prompt"] == ["a photo of sks dog"] * 3 and batch["base_prompt"] == ["a photo of a dog"] * 3


def test_class_images_travel_as_a_nested_sub_batch(tmp_path):
    instance = _dataset(tmp_path, center_crop=True)
    klass_items = folder_to_items([_gradient(tmp_path / f"c{i}.png", (32, 40)) for i in range(5)],
                                  {"prompt": "a photo of a dog"})
    paired = WithClassImages(instance, ConceptDataset(klass_items, 32, center_crop=True))
    assert len(paired) == 5  # the longer of the two
    example = paired[4]
    assert example["image_index"] == 1 and example["class"]["image_index"] == 4  # instance wraps, class does not
    batch = collate_examples([paired[i] for i in (0, 4)])
    assert batch["prompt"] == ["a photo of sks dog"] * 2 and batch["image_index"].tolist() == [0, 1]
    assert batch["class"]["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["class"]["prompt"] == ["a photo of a dog"] * 2 and batch["class"]["image_index"].tolist() == [0, 4]
    assert torch.equal(batch["class"]["pixel_values"][1], paired.klass[4]["pixel_values"])


def test_rows_to_items_keep_every_field(tmp_path):
    row = ConceptRow(tmp_path / "a.png", "p sks", "t sks", "b", "sks x")
    assert rows_to_items([row]) == [{"image_path": tmp_path / "a.png", "prompt": "p sks", "target_prompt": "t sks",
                                     "base_prompt": "b", "instance_word": "sks x"}]


# ---------- list_instance_images ----------

def test_list_instance_images_skips_non_images_with_one_warning(tmp_path):
    for name in ("b.PNG", "a.JPG", "c.jpeg", "d.webp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "nested.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = list_instance_images(tmp_path)
    assert [p.name for p in images] == ["a.JPG", "b.PNG", "c.jpeg", "d.webp"]
    assert len(caught) == 1 and "notes.txt" in str(caught[0].message)


def test_list_instance_images_without_skips_does_not_warn(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list_instance_images(tmp_path) == [tmp_path / "a.png"]


def test_list_instance_images_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no images") as err:
        list_instance_images(tmp_path)
    assert str(tmp_path) in str(err.value) and ".png" in str(err.value)
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as err:
        list_instance_images(missing)
    assert str(missing) in str(err.value)


# ---------- read_concept_csv ----------

def _concept(tmp_path, text, image=True):
    if image:
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "img.png")
    (tmp_path / "c.csv").write_text(text)
    return tmp_path / "c.csv"


def test_read_concept_csv_reads_every_row_as_strings(tmp_path):
    rows = "\n".join([GOOD_ROW] * 8 + ["img.png,1,NA,null,0"])
    csv_path = _concept(tmp_path, f"{HEADER}\n{rows}\n")
    result = read_concept_csv(tmp_path, "c.csv")
    assert len(result) == 9  # no truncation
    assert result[0] == ConceptRow(tmp_path / "img.png", "a photo of sks dog", "a photo of sks dog",
                                   "a photo of a dog", "sks dog")
    assert (result[-1].prompt, result[-1].target_prompt, result[-1].base_prompt) == ("1", "NA", "null")
    # an absolute csv_name is used as is; its relative image paths still resolve against data_path
    moved = tmp_path / "elsewhere" / "moved.csv"
    moved.parent.mkdir()
    csv_path.rename(moved)
    assert read_concept_csv(tmp_path, str(moved)) == result


def test_read_concept_csv_resolves_against_cwd_second(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "img.png")
    (tmp_path / "csvs").mkdir()
    (tmp_path / "csvs" / "c.csv").write_text(f"{HEADER}\n{GOOD_ROW.replace('img.png', 'imgs/img.png')}\n")
    monkeypatch.chdir(tmp_path)
    [row] = read_concept_csv(tmp_path / "csvs", "c.csv")
    assert row.image_path.resolve() == (tmp_path / "imgs" / "img.png").resolve()


def test_read_concept_csv_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found") as err:
        read_concept_csv(tmp_path, "nope.csv")
    assert str(tmp_path / "nope.csv") in str(err.value) and "--csv_name" in str(err.value)


@pytest.mark.parametrize("text, expected", [("", "is empty"), (f"{HEADER}\n", "no data rows")])
def test_read_concept_csv_empty(tmp_path, text, expected):
    csv_path = _concept(tmp_path, text)
    with pytest.raises(ValueError, match=expected) as err:
        read_concept_csv(tmp_path, "c.csv")
    assert str(csv_path) in str(err.value)


def test_read_concept_csv_unreadable(tmp_path):
    (tmp_path / "c.csv").write_bytes(b"\xff\xfe\x00\x81binary\x00\xc3(")
    with pytest.raises(ValueError, match="cannot be read") as err:
        read_concept_csv(tmp_path, "c.csv")
    assert str(tmp_path / "c.csv") in str(err.value)


def test_read_concept_csv_missing_columns(tmp_path):
    csv_path = _concept(tmp_path, "image_path,prompt,instance_word\nimg.png,a sks dog,sks dog\n")
    with pytest.raises(ValueError) as err:
        read_concept_csv(tmp_path, "c.csv")
    message = str(err.value)
    assert str(csv_path) in message and "target_prompt, base_prompt" in message
    assert all(column in message for column in CSV_COLUMNS)  # lists the expected header


def test_read_concept_csv_empty_cell(tmp_path):
    bad = "img.png,a photo of sks dog,a photo of sks dog,  ,sks dog"
    csv_path = _concept(tmp_path, f"{HEADER}\n{GOOD_ROW}\n{bad}\n")
    with pytest.raises(ValueError, match="data row 2, column 'base_prompt' is empty") as err:
        read_concept_csv(tmp_path, "c.csv")
    assert str(csv_path) in str(err.value)


def test_read_concept_csv_image_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    csv_path = _concept(tmp_path, f"{HEADER}\n{GOOD_ROW}\n{GOOD_ROW}\n{GOOD_ROW.replace('img.png', 'gone.png')}\n")
    with pytest.raises(ValueError, match="data row 3, column 'image_path'") as err:
        read_concept_csv(tmp_path / ".", "c.csv")
    message = str(err.value)
    assert str(csv_path.name) in message and "gone.png" in message
    assert str(tmp_path / "." / "gone.png") in message and str(Path.cwd() / "gone.png") in message


@pytest.mark.parametrize("broken", ["text", "truncated"])
def test_read_concept_csv_image_pil_cannot_open(tmp_path, broken):
    csv_path = _concept(tmp_path, f"{HEADER}\n{GOOD_ROW.replace('img.png', 'fake.png')}\n")
    if broken == "text":
        (tmp_path / "fake.png").write_text("not really a png")
    else:  # a valid header that opens lazily; only verify() notices the missing half
        whole = (DATA / "robot_toy" / "00.png").read_bytes()
        (tmp_path / "fake.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="data row 1, column 'image_path'.*not an image") as err:
        read_concept_csv(tmp_path, "c.csv")
    assert str(csv_path) in str(err.value)


def test_folder_to_items_rejects_empty_prompt(tmp_path):
    with pytest.raises(ValueError, match="'prompt'"):
        folder_to_items([tmp_path / "a.png"], {"prompt": ""})
