"""Every check a request must pass before a model sees it: one home for the route and the worker.

The route (:mod:`gateway.api.routes.vqa`) runs :func:`check_request` before anything is queued, so
a bad payload gets its 4xx at once and never costs a worker a slot:

1. question length;
2. ``features``: the stream container (:func:`~edge_client.bitstream.read_header`: magic, version,
   lengths, CRC), then header model == request model, codebook hash (409 ``codebook_mismatch``),
   split site, tokens, groups, stages, codebook size, stat bits (422 ``stream_mismatch`` naming the
   field), then a full :func:`~edge_client.bitstream.decode_stream` with the bundle's frequency
   table, which rejects corrupt rANS data and out-of-range indices;
3. ``image``: the pixel count from the image header (``VQA_MAX_IMAGE_PIXELS``) before decoding,
   then a full decode (:func:`~edge_client.preprocess.decode_image`).

The worker calls the same :meth:`StreamValidator.decode` and :func:`check_image`, because it
must decode the payload anyway to get indices or pixels, and the checks ride along for free. The
one check that is not redundant there is the codebook: the gateway compared the stream with its
cached copy of the published info (``VQA_REGISTRY_TTL_MS``), and a worker restarted with a new
quantizer in between must refuse the old codes (409) rather than answer from the wrong codebook.
The gateway skips the per-token neighbour search of ranked streams (``resolve_ranks=False``); only
the worker, which needs the indices, pays for it.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from edge_client.bitstream import DecodedStream, decode_stream, read_header
from edge_client.errors import ImageError
from edge_client.preprocess import decode_image, signature_format
from edge_client.protocol import VQARequest
from edge_client.ranking import NeighbourRanks

from .errors import CodebookMismatch, QuestionTooLong, StreamMismatch

__all__ = ["IMAGE_FORMATS", "STREAM_FIELDS", "StreamValidator", "check_image", "check_request"]

# The formats the wire format promises (edge_client.protocol). Opening only these keeps Pillow's
# other parsers (EPS hands files to Ghostscript, for one) away from untrusted bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Header fields compared one by one against the served quantizer, in the order they are reported.
STREAM_FIELDS = ("split_site", "tokens", "groups", "stages", "codebook_size", "stat_bits")


class StreamValidator:
    """Checks and decodes feature streams against one served quantizer.

    ``served`` holds the served value of every :data:`STREAM_FIELDS` entry (a published
    ``ModelInfo``); ``freqs``/``ranking`` come from the served edge bundle.
    """

    def __init__(
        self, served: Any, codebook_hash: str, freqs: np.ndarray | None, ranking: NeighbourRanks | None
    ) -> None:
        self.codebook_hash = codebook_hash
        self.freqs = freqs
        self.ranking = ranking
        # (name, served value) of every header field a stream must match: read once, not per request.
        self.fields = tuple((name, getattr(served, name)) for name in STREAM_FIELDS)

    def decode(self, model: str, data: bytes, *, resolve_ranks: bool = True) -> DecodedStream:
        """Check a feature stream against the served quantizer and decode it (indices, stats).

        ``resolve_ranks=False`` (the gateway, which only validates) leaves a ranked stream's
        neighbour ranks unmapped: the same checks, without the per-token codeword search.
        """
        header = read_header(data)
        if header.model != model:
            raise StreamMismatch(
                f"stream header field 'model': expected {model!r} (the request's model), got {header.model!r}"
            )
        if not header.matches_codebook(self.codebook_hash):
            raise CodebookMismatch(
                f"the stream was encoded with codebook {header.codebook_hash}, but {model} serves codebook "
                f"{self.codebook_hash[:16]}: download the current edge bundle"
            )
        for name, expected in self.fields:
            if getattr(header, name) != expected:
                raise StreamMismatch(
                    f"stream header field '{name}': expected {expected!r}, got {getattr(header, name)!r}"
                )
        return decode_stream(data, self.freqs, self.ranking, resolve_ranks=resolve_ranks)


def check_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an untrusted image, as stored (:func:`~edge_client.preprocess.decode_image`: the
    gateway only needs to know it decodes; the worker turns it upright and RGB); ImageError for
    non-images, bombs and images over ``max_pixels``.

    The format (one of :data:`IMAGE_FORMATS`) and pixel count are read from the image header,
    before anything is decoded.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                width, height = probe.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        looks = signature_format(data)
        if looks is not None:
            raise ImageError(
                f"the bytes start like a {looks} image, but its header could not be read"
            ) from None
        raise ImageError(f"expected a {', '.join(IMAGE_FORMATS)} image, got bytes of none of these") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image could not be decoded: {type(exc).__name__}") from None
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
    return decode_image(data)


def check_request(
    request: VQARequest, streams: StreamValidator, *, max_question_chars: int, max_image_pixels: int
) -> None:
    """Every gateway-side check listed in the module docstring; raises the matching 4xx error."""
    if len(request.question) > max_question_chars:
        raise QuestionTooLong(
            f"field 'question': expected at most {max_question_chars} characters, got {len(request.question)}"
        )
    if request.features is not None:
        streams.decode(request.model, request.features, resolve_ranks=False)
    else:
        assert request.image is not None  # VQARequest guarantees exactly one payload
        check_image(request.image, max_image_pixels)
