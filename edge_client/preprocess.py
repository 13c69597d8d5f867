"""Image preprocessing in numpy + Pillow, matching transformers' ``CLIPImageProcessor``.

Resize the shortest edge to ``size`` (bicubic), centre-crop ``size`` x ``size``, scale to [0, 1],
normalize by ``mean``/``std``. The edge client and the cloud-only worker path both call
:func:`preprocess`, so the two never disagree on pixels.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 40_000_000  # decompression-bomb guard: ~6300 x 6300


@dataclass(frozen=True)
class ImageSpec:
    """What the model's image processor does, as data (stored in every edge bundle)."""

    size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageSpec:
        return cls(size=int(data["size"]), mean=tuple(data["mean"]), std=tuple(data["std"]))


def load_image(data: bytes) -> Image.Image:
    """Decode untrusted image bytes to upright RGB, refusing bombs and non-images with
    :class:`ImageError`."""
    return upright_rgb(decode_image(data))


def upright_rgb(image: Image.Image) -> Image.Image:
    """A freshly decoded image (turned in place: the caller owns it) as the model sees it. Phones
    store portrait photos sideways with an EXIF orientation tag; browsers (and the web edge) show
    them upright, so the model must too."""
    ImageOps.exif_transpose(image, in_place=True)
    return on_white(image)


def decode_image(data: bytes) -> Image.Image:
    """Decode untrusted image bytes, as stored (no conversion: a check that only needs to know the
    image decodes holds one copy of its pixels); :class:`ImageError` for bombs and non-images."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS} pixels are accepted"
                )
            probe.load()
            return probe
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        if _truncated(data, exc):
            raise ImageError(
                f"image is truncated: its {len(data)} bytes end before the picture does; send the whole file"
            ) from exc
        raise ImageError(f"image could not be decoded: {type(exc).__name__}") from exc


def _truncated(data: bytes, error: Exception) -> bool:
    """Pillow says "truncated" for JPEG and PNG; a WebP's RIFF header declares its full length."""
    if "truncated" in str(error).lower():
        return True
    if signature_format(data) == "WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return False


def signature_format(data: bytes) -> str | None:
    """The image format whose signature ``data`` starts with (JPEG, PNG, WEBP), if any."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def on_white(image: Image.Image) -> Image.Image:
    """RGB ``image``, with any alpha channel (RGBA, LA, palette transparency) composited on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
    """Shortest edge to ``size`` (bicubic), centre crop; ``(size, size, 3)`` uint8. Transparent
    pixels are composited on white, as the training images' backgrounds were."""
    image = on_white(image)
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def normalize(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """``(..., H, W, 3)`` uint8 -> ``(..., 3, H, W)`` float32, scaled and normalized."""
    x: np.ndarray = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def preprocess(image: Image.Image | np.ndarray, spec: ImageSpec) -> np.ndarray:
    """One image -> ``pixel_values`` ``(3, size, size)`` float32."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return normalize(resize_and_crop(image, spec.size), spec)
