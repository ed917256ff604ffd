"""Run inputs shared by both stages: the bad-input exit, model geometry checks, class images for prior
preservation and the training dataset (instance images, paired with class images when asked)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .args import BadInput
from .data import ConceptDataset, collate_examples, folder_to_items, list_instance_images

PROMPT_KEYS = ("prompt", "target_prompt", "base_prompt")


def exit_on_bad_input(main) -> None:
    """Run ``main``; a BadInput (raised before any work) becomes one ``error:`` line and exit status 2."""
    try:
        main()
    except BadInput as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def check_model_geometry(args) -> None:
    """--resolution must survive VAE downsampling and patching; read from the configs, before any weights."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    vae_config = AutoencoderKL.load_config(args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision)
    transformer_config = SD3Transformer2DModel.load_config(args.pretrained_model_name_or_path,
                                                           subfolder="transformer", revision=args.revision)
    multiple = 2 ** (len(vae_config["block_out_channels"]) - 1) * transformer_config["patch_size"]
    if args.resolution % multiple:
        raise BadInput(f"--resolution {args.resolution} must be a multiple of {multiple} for this model "
                       f"(VAE downsampling x patch size); try {max(multiple, args.resolution // multiple * multiple)}.")


def ensure_class_images(args, accelerator, weight_dtype) -> list[dict]:
    """DreamBooth prior preservation: top --class_data_dir up to --num_class_images with base-model samples."""
    class_dir = Path(args.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    existing = list_instance_images(class_dir) if any(class_dir.iterdir()) else []
    missing = args.num_class_images - len(existing)
    if missing > 0 and accelerator.is_main_process:
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                        variant=args.variant, dtype=weight_dtype)
        pipe.to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        start = len(existing)
        for first in range(0, missing, args.sample_batch_size):
            count = min(args.sample_batch_size, missing - first)
            generator = torch.Generator().manual_seed(args.seed + start + first)
            images = pipe([args.class_prompt] * count, height=args.resolution, width=args.resolution,
                          generator=generator).images
            for offset, image in enumerate(images):
                image.save(class_dir / f"class-{start + first + offset:05d}.png")
        del pipe
    accelerator.wait_for_everyone()
    paths = list_instance_images(class_dir)[: args.num_class_images]
    return folder_to_items(paths, {"prompt": args.class_prompt})


class PairedDataset(torch.utils.data.Dataset):
    """Instance example i with class example i (mod the class count): DreamBooth's prior-preservation batch."""

    def __init__(self, instance: ConceptDataset, klass: ConceptDataset):
        self.instance, self.klass = instance, klass
        # latent caching is for the instance images
        self.items, self.resolution = instance.items, instance.resolution
        self.center_crop, self.random_flip = instance.center_crop, instance.random_flip

    def __len__(self):
        return max(len(self.instance), len(self.klass))

    def set_epoch(self, epoch: int):
        self.instance.set_epoch(epoch)
        self.klass.set_epoch(epoch)

    def __getitem__(self, index):
        return {"instance": self.instance[index % len(self.instance)], "class": self.klass[index % len(self.klass)]}


def collate_paired(examples) -> dict:
    batch = collate_examples([e["instance"] for e in examples])
    klass = collate_examples([e["class"] for e in examples])
    batch.update(class_pixel_values=klass["pixel_values"], class_image_index=klass["image_index"],
                 class_prompt=klass["prompt"])
    return batch


def make_run_dataset(args, items, class_items=None):
    """(dataset, collate_fn) for this run's instance items, paired with class items under prior preservation."""
    dataset = ConceptDataset(items, args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                             repeats=args.repeats, seed=args.seed)
    if not class_items:
        return dataset, collate_examples
    klass = ConceptDataset(class_items, args.resolution, center_crop=args.center_crop,
                           random_flip=args.random_flip, repeats=1, seed=args.seed + 1)
    return PairedDataset(dataset, klass), collate_paired
