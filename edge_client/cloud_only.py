"""The cloud-only baseline payload: the picture itself, resized as the model sees it, as JPEG-90.

Used by ``EdgeClient(cloud_only=True)`` and by the byte benchmarks, so both send and count exactly
the same bytes. The paper compares AlignedVQ against JPEG at quality 90.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError
from .preprocess import load_image, resize_and_crop

__all__ = ["JPEG_QUALITY", "ImageInput", "jpeg_payload", "read_image"]

JPEG_QUALITY = 90

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


def read_image(image: ImageInput) -> bytes | Image.Image | np.ndarray:
    """Encoded bytes, a PIL image or an array: what the encoders take; a path is read here."""
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read image {image}: {exc.strerror or exc}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return image


def jpeg_payload(image: bytes | Image.Image | np.ndarray, size: int) -> bytes:
    """Cloud-only payload: the image at the model's input size, JPEG quality 90."""
    if isinstance(image, bytes):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(f"expected an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a path, bytes, PIL image or uint8 array, got {type(image).__name__}")
    out = io.BytesIO()
    Image.fromarray(resize_and_crop(image, size)).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
