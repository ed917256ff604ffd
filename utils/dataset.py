"""Items -> training batches: image preprocessing, the dataset (with class images for prior preservation as a nested
sub-batch), the resumable sampler and dataloader, the latent cache and the class images themselves.

No torchvision: preprocessing is PIL + numpy. Every random choice (crop offset, flip, data order) is a function of
(--seed, epoch, index) alone, so a resumed run replays exactly what the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image

from .data import folder_to_items, list_instance_images, open_rgb
from .flow_matching import add_noise, encode_latents, latents_from_distribution

logger = logging.getLogger("purecc")


# ----------------------------------------------------------------------------------------------- one image
def load_image(path, resolution: int, center_crop: bool, flip: bool, rng: random.Random | None) -> torch.Tensor:
    """[3, resolution, resolution] float32 in [-1, 1]: RGB (``open_rgb``), short side resized (Lanczos) to
    ``resolution``, cropped (centre, or at an offset drawn from ``rng``), mirrored if ``flip``."""
    if not center_crop and rng is None:
        raise ValueError("load_image: a random crop needs rng (a random.Random); pass one or center_crop=True.")
    image = resize_short_side(open_rgb(path), resolution)
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


# ----------------------------------------------------------------------------------------------- datasets
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
        return {"pixel_values": pixels, "image_index": image_index, "image_path": str(item["image_path"]), **strings}


class WithClassImages(torch.utils.data.Dataset):
    """DreamBooth prior preservation: instance example i carries class example i (mod the class count) under
    ``"class"``; the epoch is as long as the longer of the two."""

    def __init__(self, instance: ConceptDataset, klass: ConceptDataset):
        self.instance, self.klass = instance, klass

    def __len__(self) -> int:
        return max(len(self.instance), len(self.klass))

    def set_epoch(self, epoch: int) -> None:
        self.instance.set_epoch(epoch)
        self.klass.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        return {**self.instance[index % len(self.instance)], "class": self.klass[index % len(self.klass)]}


def collate_examples(examples: list[dict]) -> dict:
    """A batch: stacked float32 pixels, image indices as a LongTensor, each string field as a list of str, and
    the class examples (if any) collated the same way under ``"class"``."""
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).to(torch.float32).contiguous(),
        "image_index": torch.tensor([e["image_index"] for e in examples], dtype=torch.long),
    }
    for key, value in examples[0].items():
        if isinstance(value, str):
            batch[key] = [e[key] for e in examples]
    if "class" in examples[0]:
        batch["class"] = collate_examples([e["class"] for e in examples])
    return batch


def make_dataset(args, items: list[dict], class_items: list[dict] | None = None):
    """This run's dataset: the instance items, with the class items nested under prior preservation."""
    dataset = ConceptDataset(items, args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                             repeats=args.repeats, seed=args.seed)
    if not class_items:
        return dataset
    klass = ConceptDataset(class_items, args.resolution, center_crop=args.center_crop,
                           random_flip=args.random_flip, repeats=1, seed=args.seed + 1)
    return WithClassImages(dataset, klass)


# ----------------------------------------------------------------------------------------------- order
class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): a resumed run replays exactly the same order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


def make_dataloader(args, dataset) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, collate_fn=collate_examples,
                                       sampler=EpochShuffleSampler(len(dataset), args.seed),
                                       num_workers=args.dataloader_num_workers)


# ----------------------------------------------------------------------------------------------- latents
class LatentCache:
    """VAE posterior parameters per *image* (``image_index``), never per step: a shuffled loader must pair each
    caption with its own image's latent. Sampled afresh each step from the cached distribution.

    Each image is encoded once in its canonical view (centre crop, no flip): augmentation cannot apply to a
    latent computed once, so we say so instead of silently freezing one random view."""

    def __init__(self, vae, dataset: ConceptDataset, device):
        if dataset.random_flip or not dataset.center_crop:
            logger.warning("--cache_latents: each image is encoded once, centre-cropped and unflipped; "
                           "--random_flip and random crops do not apply to cached latents.")
        self.vae_config = vae.config
        self.params = {}
        with torch.no_grad():
            for index, item in enumerate(dataset.items):
                pixels = load_image(item["image_path"], dataset.resolution, center_crop=True, flip=False, rng=None)
                self.params[index] = vae.encode(pixels.unsqueeze(0).to(device, vae.dtype)).latent_dist.parameters.cpu()

    def sample(self, image_indices, generator: torch.Generator, device) -> torch.Tensor:
        params = torch.cat([self.params[int(i)] for i in image_indices])
        return latents_from_distribution(params, self.vae_config, generator=generator).to(device)


def batch_latents(vae, batch: dict, latent_cache: LatentCache | None, generator, device) -> torch.Tensor:
    """x0 of a batch (or of its ``"class"`` sub-batch): a posterior sample, from the cache when there is one."""
    if latent_cache is not None:
        return latent_cache.sample(batch["image_index"], generator, device)
    with torch.no_grad():
        return encode_latents(vae, batch["pixel_values"].to(device, vae.dtype), generator=generator)


def class_group(batch: dict, vae, noise_scheduler, args, generator, device) -> list:
    """Prior preservation's class sub-batch noised with its own noise and timesteps, as a one-element list of
    (Noised, prompts) to ride along in a forward pass; [] without prior preservation."""
    if "class" not in batch:
        return []
    x0 = batch_latents(vae, batch["class"], None, generator, device)
    return [(add_noise(x0, noise_scheduler, args, generator), batch["class"]["prompt"])]


def make_training_data(args, accelerator, items, class_items, vae):
    """(dataset, dataloader, latent cache or None) of this run."""
    dataset = make_dataset(args, items, class_items)
    instance = dataset.instance if isinstance(dataset, WithClassImages) else dataset
    latent_cache = LatentCache(vae, instance, accelerator.device) if args.cache_latents else None
    return dataset, make_dataloader(args, dataset), latent_cache


# ----------------------------------------------------------------------------------------------- class images
def ensure_class_images(args, accelerator, weight_dtype) -> list[dict]:
    """DreamBooth prior preservation: top --class_data_dir up to --num_class_images with base-model samples."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = list_instance_images(class_dir) if any(class_dir.iterdir()) else []
    missing = args.num_class_images - len(existing)
    if missing > 0 and accelerator.is_main_process:
        pipe = StableDiffusion3Pipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                        variant=args.variant, dtype=weight_dtype)
        pipe.to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        start = len(existing)
        for first in range(0, missing, args.sample_batch_size):
            count = min(args.sample_batch_size, missing - first)
            generator = torch.Generator().manual_seed(args.seed + start + first)
            images = pipe([args.class_prompt] * count, height=args.resolution, width=args.resolution,
                          generator=generator, max_sequence_length=args.max_sequence_length).images
            for offset, image in enumerate(images):
                image.save(class_dir / f"class-{start + first + offset:05d}.png")
        del pipe
    accelerator.wait_for_everyone()
    paths = list_instance_images(class_dir)[: args.num_class_images]
    return folder_to_items(paths, {"prompt": args.class_prompt})
