"""Auxiliary per-patch loss from the scene generator's ground truth (training only, never served).

A VQA loss alone teaches a small LLaVA where objects are slowly: one answer word per question is
all the signal. Here each patch of the vision tower's output also predicts, for the object whose
centre lies in it, its colour, shape and size, the colour of its nearest other object, and where in
the patch its centre is (none-classes for empty patches). The head reads the last vision block
through a forward hook, so the same code serves plain training and quantization-aware training
through the split halves. The head is discarded with the run; the served model is plain HF LLaVA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .scenes import COLOR_NAMES, SHAPES, SIZES

# Per patch: colour, shape, size, nearest other object's colour (class indices; the last class of
# each means "no object centre here"), then the centre's position in the image (x, y in [0, 1)):
# absolute, so that "left of" becomes a comparison of two linearly readable numbers.
CLASSES = (len(COLOR_NAMES) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(COLOR_NAMES) + 1)
FIELDS = len(CLASSES) + 2


def patch_targets(objects: np.ndarray, image_size: int, patch: int) -> np.ndarray:
    """``(images, patches, FIELDS)`` float32 targets from object records ``(images, max_objects, 6)``.

    Where two centres share a patch, the one nearer the patch centre is the target.
    """
    grid = image_size // patch
    out = np.zeros((objects.shape[0], grid * grid, FIELDS), np.float32)
    out[..., : len(CLASSES)] = np.asarray(CLASSES, np.float32) - 1  # "none" everywhere first
    best = np.full((objects.shape[0], grid * grid), math.inf)
    for i, rows in enumerate(objects):
        live = rows[rows[:, 0] >= 0]
        for j, (cx, cy, color, shape, size, _) in enumerate(live):
            col, row = min(int(cx // patch), grid - 1), min(int(cy // patch), grid - 1)
            fx, fy = cx / patch - col, cy / patch - row
            off_centre = (fx - 0.5) ** 2 + (fy - 0.5) ** 2
            p = row * grid + col
            if off_centre >= best[i, p]:
                continue
            best[i, p] = off_centre
            dist = np.hypot(live[:, 0] - cx, live[:, 1] - cy)
            dist[j] = math.inf
            out[i, p] = (color, shape, size, live[int(dist.argmin()), 2], cx / image_size, cy / image_size)
    return out


class PatchHead(nn.Module):
    """Linear read-out of every patch token: class logits per field and a two-number offset."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, sum(CLASSES) + 2)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the class fields plus the offset error on patches holding a centre.

        ``tokens`` ``(batch, patches, hidden)``; ``targets`` ``(batch, patches, FIELDS)``.
        """
        out = self.proj(tokens.float())
        loss = out.new_zeros(())
        start = 0
        for field, classes in enumerate(CLASSES):
            logits = out[..., start : start + classes]
            loss = loss + F.cross_entropy(logits.flatten(0, 1), targets[..., field].long().flatten())
            start += classes
        present = targets[..., 0] < CLASSES[0] - 1
        if present.any():
            loss = loss + 4.0 * F.mse_loss(out[..., start:][present].sigmoid(), targets[..., -2:][present])
        return loss


@contextmanager
def last_block_output(vision_encoder: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the patch tokens (CLS dropped) leaving the encoder's last block, in ``box["tokens"]``."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        box["tokens"] = hidden[:, 1:]

    handle = vision_encoder.layers[-1].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()
