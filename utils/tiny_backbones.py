"""Tiny random-weight evaluation backbones built offline, in the layout ``from_pretrained`` reads, for tests and
smoke runs of eval.py: a CLIP (for CLIP-I / CLIP-T, and as a stand-in PickScore or HPS model), a DINO-style ViT and
a Segment-Anything model. Their scores mean nothing; the code paths that compute them are the real ones.

    python -m utils.tiny_backbones OUT_DIR     # writes OUT_DIR/clip, OUT_DIR/dino, OUT_DIR/sam
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer, SamConfig,
                          SamImageProcessor, SamModel, SamProcessor, ViTConfig, ViTImageProcessor, ViTModel)

from .tiny_sd3 import write_text_encoders

IMAGE_SIZE = 32


def build_clip(out: Path, seed: int = 0) -> Path:
    """A CLIP with the tiny CLIP-L tokenizer of utils.tiny_sd3 and a 32-px, 4-patch vision tower."""
    scratch = out.parent / f"{out.name}_tokenizers"
    write_text_encoders(scratch, "sd35", seed)
    tokenizer = CLIPTokenizer.from_pretrained(scratch, subfolder="tokenizer")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    shutil.rmtree(scratch)
    return out


def build_dino(out: Path, seed: int = 1) -> Path:
    """A ViT the size of a thumbnail (DINO ViT-S/16's architecture, shrunk)."""
    torch.manual_seed(seed)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64)
    ViTModel(config).eval().save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(out)
    return out


def build_sam(out: Path, seed: int = 2) -> Path:
    """A Segment-Anything model with a 64-px, 16-patch image encoder."""
    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16,
                           output_channels=32, mlp_dim=64, global_attn_indexes=[1], window_size=2, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=16, image_embedding_size=4),
        mask_decoder_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                 iou_head_hidden_dim=32))
    SamModel(config).eval().save_pretrained(out, safe_serialization=True)
    SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64},
                                                   mask_size={"longest_edge": 64})).save_pretrained(out)
    return out


def build_all(out_dir) -> dict[str, Path]:
    out = Path(out_dir)
    return {"clip": build_clip(out / "clip"), "dino": build_dino(out / "dino"), "sam": build_sam(out / "sam")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    for name, path in build_all(parser.parse_args(argv).out_dir).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
