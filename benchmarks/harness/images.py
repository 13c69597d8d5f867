"""Real photographs without a download, and the picture codecs the cloud-only baselines use.

The photos are scikit-image's bundled sample data (files inside its wheel): ``wire_bytes``,
``edge_cost`` and ``e2e_network`` measure the same ones, and the LLaVA-1.5 geometry's tables are
fitted on *other* pictures of that set (:data:`CALIBRATION`), never on the measured photos.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from edge_client.preprocess import resize_and_crop

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field")
CALIBRATION = (
    "camera", "brick", "grass", "gravel", "moon", "coins", "page", "text", "clock", "colorwheel",
    "immunohistochemistry", "cell", "logo", "horse",
)  # fmt: skip
CALIBRATION_CROPS = 36  # per picture


def load_photos(names: tuple[str, ...] = PHOTOS) -> dict[str, Image.Image]:
    """RGB photographs from scikit-image's bundled data (files inside the wheel, no download)."""
    import skimage.data

    photos = {}
    for name in names:
        if name == "motorcycle_left":  # the left view of the stereo pair
            array = skimage.data.stereo_motorcycle()[0]
        else:
            array = getattr(skimage.data, name)()
        photos[name] = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    return photos


def calibration_crops(size: int, seed: int) -> np.ndarray:
    """``(n, size, size, 3)`` uint8 random crops (every other one mirrored) of :data:`CALIBRATION`."""
    import skimage.data

    rng = np.random.default_rng(seed)
    crops = []
    for name in CALIBRATION:
        array = getattr(skimage.data, name)()
        if array.dtype != np.uint8:  # a few are bool or float in [0, 1]
            array = (np.asarray(array, dtype=np.float64) * 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
        for k in range(CALIBRATION_CROPS):
            width, height = image.size
            scale = rng.uniform(0.4, 1.0)
            w, h = int(width * scale), int(height * scale)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = image.crop((x, y, x + w, y + h))
            if k % 2:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            crops.append(resize_and_crop(crop, size))
    return np.stack(crops)


def encode_picture(pixels: np.ndarray, fmt: str, **options: Any) -> bytes:
    """``pixels`` saved by Pillow as ``fmt`` (JPEG, WEBP, PNG, AVIF) with ``options``."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **options)
    return out.getvalue()
