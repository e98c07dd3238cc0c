"""Image classification: images preprocessed once into pixel tensors by the model's own image
processor; train-time augmentation (flip, crop, colour) applied per batch, none at evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...data.batching import shuffled_plan
from ...models.capture import features_while
from ...train.loop import Batches
from ...train.precision import autocast
from ..tabular.model import class_ids


@dataclass
class ImageSplit:
    pixels: torch.Tensor  # (n, channels, height, width), already normalised by the processor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def encode(bundle, frame, labels, recipe) -> ImageSplit:
    from PIL import Image

    images = []
    for path in frame["path"]:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
    pixels = bundle.tokenizer(images=images, return_tensors="pt")["pixel_values"].float()
    return ImageSplit(pixels, class_ids(frame, labels) if labels is not None else torch.full((len(frame),), -1))


def subset(split: ImageSplit, idx: torch.Tensor) -> ImageSplit:
    return ImageSplit(split.pixels[idx], split.labels[idx])


def collate(split: ImageSplit, indices, pad_id: int = 0) -> dict:
    idx = torch.as_tensor(indices, dtype=torch.long)
    return {"pixel_values": split.pixels[idx], "labels": split.labels[idx]}


def augment(pixels: torch.Tensor, spec, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip, random resized crop and brightness/contrast jitter, on tensors."""
    n, _, h, w = pixels.shape
    out = pixels.clone()
    if spec.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    if spec.crop < 1.0:
        crops = []
        for img in out:
            scale = spec.crop + (1 - spec.crop) * float(torch.rand(1, generator=generator))
            ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
            top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
            patch = img[:, top : top + ch, left : left + cw].unsqueeze(0)
            crops.append(F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)[0])
        out = torch.stack(crops)
    if spec.color > 0:
        brightness = 1 + spec.color * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        contrast = 1 + spec.color * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean * brightness
    return out


def batches(split: ImageSplit, recipe, seed: int, pad_id: int = 0) -> Batches:
    """Batches for training, with the recipe's augmentation; deterministic per (seed, epoch, batch)."""
    spec = recipe.augment

    def train_collate(indices):
        batch = collate(split, indices)
        if spec is not None:
            g = torch.Generator().manual_seed(seed * 7919 + sum(int(i) * 31 ** k for k, i in enumerate(indices[:8])) % (2**31))
            batch["pixel_values"] = augment(batch["pixel_values"], spec, g)
        return batch

    return Batches(size=len(split), plan=shuffled_plan(len(split), recipe.train.batch_size, seed), collate=train_collate)


@torch.no_grad()
def predict(model: nn.Module, split: ImageSplit, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    was = model.training
    model.eval()
    chunks = []
    for start in range(0, len(split), batch_size):
        with autocast(precision, device):
            out = model(pixel_values=split.pixels[start : start + batch_size].to(device))
        chunks.append((out if isinstance(out, torch.Tensor) else out.logits).float().cpu())
    model.train(was)
    return torch.cat(chunks)


features = features_while(predict)
