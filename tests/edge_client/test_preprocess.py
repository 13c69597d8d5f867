"""Decoding untrusted images: upright as the photographer saw them, transparency on white."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from edge_client.preprocess import load_image


def test_exif_orientation_is_applied_as_browsers_do() -> None:
    # Stored 40 wide x 20 high, left half white, tagged "rotate 90 degrees clockwise to display".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    upright = np.asarray(load_image(out.getvalue()))
    assert upright.shape == (40, 20, 3)
    assert upright[:18].mean() > 200 and upright[22:].mean() < 50  # the white half is now on top
