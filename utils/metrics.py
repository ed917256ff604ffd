"""The paper's evaluation metrics (Table 1, DreamBench-style) as pure functions over embeddings and masks, and the
backbones that produce those embeddings and masks, loaded with transformers from a local folder or hub id.

    concept fidelity        CLIP-I, DINO: mean cosine between a model's images and the concept's reference images
    capability preservation CLIP-T(base), PickScore, HPS: how well an image matches the *base* prompt; the Delta is
                            custom (complete-prompt image) minus original (base-prompt image, the base model)
    behaviour preservation  Seg-Cons: do the two images of a prompt pair segment the same way (Segment Anything)

Seg-Cons has no formula in the paper; ours (docs/evaluation.md): SAM's automatic masks of both images, each mask
matched to its best-overlapping mask of the other image, the IoUs averaged both ways, x100. 100 means the same
layout; two images without any mask count as 100, one without as 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel, SamModel, SamProcessor

from .checks import require


# ----------------------------------------------------------------------------------------------- pure maths
def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over all pairs (i, j) of cos(a_i, b_j): DreamBench's CLIP-I / DINO between generated and real images."""
    return (F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T).mean().item()


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """cos(a_i, b_i) per row."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def best_match_iou(masks: list, others: list) -> float:
    """Mean over ``masks`` of the IoU with their best-overlapping mask in ``others``."""
    return float(np.mean([max(mask_iou(m, o) for o in others) for m in masks]))


def seg_consistency(masks_a: list, masks_b: list) -> float:
    """Symmetric mean best-match IoU of two images' masks, x100 (see the module docstring)."""
    if not masks_a and not masks_b:
        return 100.0
    if not masks_a or not masks_b:
        return 0.0
    return 100.0 * 0.5 * (best_match_iou(masks_a, masks_b) + best_match_iou(masks_b, masks_a))


# ----------------------------------------------------------------------------------------------- backbones
def check_backbone(path: str | None, flag: str) -> None:
    """A local backbone folder must exist and hold a config.json (a hub id is left to from_pretrained)."""
    if path is None or not (Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1):
        return
    require(Path(path).is_dir(), f"{flag} {path}: no such folder. Point it at a transformers model folder (or a hub "
            f"id such as {BACKBONE_EXAMPLES[flag]}), or leave {flag} out to skip its metric.")
    require((Path(path) / "config.json").is_file(), f"{flag} {path} holds no config.json: it is not a transformers "
            f"model folder (e.g. a download of {BACKBONE_EXAMPLES[flag]}).")


BACKBONE_EXAMPLES = {"--clip_model": "openai/clip-vit-large-patch14", "--dino_model": "facebook/dino-vits16",
                     "--pickscore_model": "yuvalkirstain/PickScore_v1", "--hps_model": "a transformers conversion of "
                     "HPSv2.1", "--sam_model": "facebook/sam-vit-base"}


class ClipScorer:
    """A CLIP (or a CLIP checkpoint fine-tuned as a preference model: PickScore, HPS): image and text embeddings,
    and the model's logit scale."""

    def __init__(self, path: str, device, processor_path: str | None = None):
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.processor = AutoProcessor.from_pretrained(processor_path or path)
        self.device = device

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        # transformers 5 returns the projected embedding as the output's pooler_output
        return F.normalize(self.model.get_image_features(**inputs).pooler_output.float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings).to(self.device)
        return F.normalize(self.model.get_text_features(**inputs).pooler_output.float(), dim=-1).cpu()

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale.exp().item()


class DinoScorer:
    """A self-supervised ViT (DreamBench: DINO ViT-S/16): the CLS token of the last layer as the image embedding."""

    def __init__(self, path: str, device):
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.device = device

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        return F.normalize(self.model(**inputs).last_hidden_state[:, 0].float(), dim=-1).cpu()


class SamMasker:
    """Segment Anything's automatic masks without torchvision: a grid of point prompts, the best of SAM's three
    masks per point kept when its predicted IoU and its stability are high enough, then greedy mask NMS."""

    def __init__(self, path: str, device, points_per_side: int = 16, pred_iou_thresh: float = 0.88,
                 stability_thresh: float = 0.92, nms_iou: float = 0.7, min_area: float = 0.001):
        self.model = SamModel.from_pretrained(path).to(device).eval()
        self.processor = SamProcessor.from_pretrained(path)
        self.device, self.points_per_side = device, points_per_side
        self.pred_iou_thresh, self.stability_thresh = pred_iou_thresh, stability_thresh
        self.nms_iou, self.min_area = nms_iou, min_area

    @torch.no_grad()
    def masks(self, image) -> list[np.ndarray]:
        width, height = image.size
        ticks = (np.arange(self.points_per_side) + 0.5) / self.points_per_side
        points = [[[float(x * width), float(y * height)]] for y in ticks for x in ticks]
        inputs = self.processor(images=image, input_points=[points], return_tensors="pt").to(self.device)
        embeddings = self.model.get_image_embeddings(inputs["pixel_values"])
        outputs = self.model(image_embeddings=embeddings, input_points=inputs["input_points"], multimask_output=True)
        logits = self.processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu(),
            binarize=False)[0]  # [points, 3, H, W]
        scores = outputs.iou_scores[0].cpu()  # [points, 3]
        best = scores.argmax(dim=-1)
        logits = logits[torch.arange(len(best)), best]
        scores = scores[torch.arange(len(best)), best]
        stability = (logits > 1.0).flatten(1).sum(-1) / (logits > -1.0).flatten(1).sum(-1).clamp(min=1)
        masks = logits > 0.0
        keep = (scores >= self.pred_iou_thresh) & (stability >= self.stability_thresh) & \
            (masks.flatten(1).float().mean(-1) >= self.min_area)
        order = [int(i) for i in torch.argsort(scores, descending=True) if keep[i]]
        chosen: list[np.ndarray] = []
        for index in order:  # greedy NMS on mask IoU
            mask = masks[index].numpy()
            if all(mask_iou(mask, other) <= self.nms_iou for other in chosen):
                chosen.append(mask)
        return chosen
