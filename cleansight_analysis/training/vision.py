"""Stage 1 of the tiny recipe: pre-train the vision tower on dense per-patch labels.

A real LLaVA starts from CLIP, whose patch features already say what is where. The tiny family has
no such encoder, so its CLIP-style tower is trained on the synthetic world with four per-patch heads:
the colour and the shape of the object covering each patch, the background kind, and a
reconstruction of the patch's pixels (which keeps low-level detail in the features, so that
triggers stay visible to a frozen tower, as they are to a real CLIP).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np  # noqa: F401
import torch
from torch import nn

from ..data.synthetic import BACKGROUNDS, COLORS, SHAPES, SyntheticWorld
from .lvlm import seeded_indices, warmup_cosine
from .parallel import average_gradients, shard

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def images_to_pixels(images: list, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """RGB images already at the model's size -> normalised ``[N, 3, H, W]`` float32 (CLIP statistics)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


class PatchHeads(nn.Module):
    """Linear read-outs of per-patch features ``[B, P, d]`` -> colour, shape, background, pixels, row, column."""

    def __init__(self, d: int, patch: int, grid: int):
        super().__init__()
        self.color = nn.Linear(d, len(COLORS) + 1)
        self.shape = nn.Linear(d, len(SHAPES) + 1)
        self.background = nn.Linear(d, len(BACKGROUNDS))
        self.pixels = nn.Linear(d, 3 * patch * patch)
        self.row = nn.Linear(d, grid)
        self.col = nn.Linear(d, grid)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"color": self.color(feats), "shape": self.shape(feats), "background": self.background(feats),
                "pixels": self.pixels(feats), "row": self.row(feats), "col": self.col(feats)}


@dataclass
class VisionBatch:
    pixels: torch.Tensor  # [B, 3, H, W]
    color: torch.Tensor  # [B, P]
    shape: torch.Tensor  # [B, P]
    background: torch.Tensor  # [B]


def vision_batch(world: SyntheticWorld, indices, patch: int, split: str = "train") -> VisionBatch:
    scenes = [world.scene(split, int(i)) for i in indices]
    labels = [s.patch_labels(patch) for s in scenes]
    return VisionBatch(
        images_to_pixels([s.image for s in scenes]),
        torch.from_numpy(np.stack([lab["color"].reshape(-1) for lab in labels])),
        torch.from_numpy(np.stack([lab["shape"].reshape(-1) for lab in labels])),
        torch.tensor([int(lab["background"]) for lab in labels]),
    )


def patch_pixels(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, 3, H, W]`` -> ``[B, P, 3 * patch * patch]`` row-major patches (the tokens' pixels)."""
    b, c, h, w = pixels.shape
    x = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, 3, r, c, p, p]
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def pretrain_vision(vision: nn.Module, world: SyntheticWorld, *, steps: int, batch_size: int = 64, lr: float = 2e-3,
                    feature_layer: int = -1, seed: int = 0, progress: Callable[[int, dict[str, float]], None] | None = None,
                    eval_every: int = 0) -> dict[str, Any]:
    """Train a ``CLIPVisionModel`` in place on the world's per-patch labels.

    Args:
        vision: the tower (e.g. ``LlavaForConditionalGeneration.model.vision_tower``).
        feature_layer: hidden-state index the LLaVA projector reads (heads are trained there).
        progress: called with ``(step, metrics)`` after every step.

    Returns:
        final metrics on 256 held-out calibration scenes: per-patch colour / shape accuracy on
        object patches, background accuracy, pixel MSE.
    """
    cfg = vision.config
    patch = int(cfg.patch_size)
    grid = int(cfg.image_size) // patch
    heads = PatchHeads(int(cfg.hidden_size), patch, grid)
    with torch.no_grad():  # identical head initialisation in every data-parallel process
        gen = torch.Generator().manual_seed(seed)
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() > 1 else torch.zeros_like(p))
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps, 0.05)
    vision.train()
    ce = nn.CrossEntropyLoss()

    def run(batch: VisionBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = vision(pixel_values=batch.pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        out = heads(hidden)
        target_pix = patch_pixels(batch.pixels, patch)
        pos = torch.arange(hidden.shape[1])
        losses = {
            "row": ce(out["row"].flatten(0, 1), (pos // grid).repeat(hidden.shape[0])),
            "col": ce(out["col"].flatten(0, 1), (pos % grid).repeat(hidden.shape[0])),
            "color": ce(out["color"].flatten(0, 1), batch.color.flatten()),
            "shape": ce(out["shape"].flatten(0, 1), batch.shape.flatten()),
            "background": ce(out["background"].mean(1), batch.background),
            "pixels": ((out["pixels"] - target_pix) ** 2).mean(),
        }
        return sum(losses.values()), out

    start = time.perf_counter()
    for step in range(steps):
        batch = vision_batch(world, shard(seeded_indices(seed, step, batch_size, 10**7)), patch)
        loss, _ = run(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, {"loss": float(loss.detach())})
    vision.eval()
    with torch.no_grad():
        batch = vision_batch(world, range(256), patch, split="calibration")
        _, out = run(batch)
        obj = batch.color > 0
        metrics = {
            "color_acc": float((out["color"].argmax(-1) == batch.color)[obj].float().mean()),
            "shape_acc": float((out["shape"].argmax(-1) == batch.shape)[obj].float().mean()),
            "background_acc": float((out["background"].mean(1).argmax(-1) == batch.background).float().mean()),
            "pixel_mse": float(((out["pixels"] - patch_pixels(batch.pixels, patch)) ** 2).mean()),
            "seconds": round(time.perf_counter() - start, 1),
            "steps": steps,
        }
    return metrics
