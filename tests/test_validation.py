"""--validation_prompt: PNGs under <output>/validation and images in tensorboard, rendered from cached embeddings."""

from __future__ import annotations

from helpers import REPO_ROOT
from PIL import Image

import train_stage1_sd3 as stage1


def test_validation_images_saved_and_logged(tiny_sd35_path, tmp_path):
    out = tmp_path / "s1"
    stage1.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path", str(REPO_ROOT / "data"),
                 "--csv_name", "robot_toy.csv", "--output_dir", str(out), "--resolution", "64",
                 "--max_train_steps", "5", "--validation_prompt", "a photo of sks robot toy in paris",
                 "--validation_epochs", "1", "--num_validation_images", "2", "--validation_steps", "2"])
    names = sorted(p.name for p in (out / "validation").iterdir())
    # 5 images, batch 1: one epoch of 5 steps, then the final render
    assert names == ["final-000005-0.png", "final-000005-1.png", "validation-000005-0.png", "validation-000005-1.png"]
    assert Image.open(out / "validation" / names[0]).size == (64, 64)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in (out / "logs").rglob("events.out.tfevents.*")}
    tags = set()
    for folder in event_dirs:
        events = EventAccumulator(str(folder))
        events.Reload()
        tags |= set(events.Tags()["images"]) | set(events.Tags()["scalars"])
    assert {"validation", "final", "loss", "lr"} <= tags
