"""The model side of a worker: the cloud half, the codebook and batched generation (imports torch).

A :class:`Runner` holds one model cut at its quantizer's split site. ``prepare`` turns a request
into model inputs (the feature stream decoded and checked against the served codebook, or a
cloud-only image decoded and preprocessed); ``run`` answers a batch of them at once:

    features -> indices (tokens, G, S) -> quantizer.decode (codebook gather, up-projection)
    image    -> preprocess -> edge half (patch embedding, pre-LN, first blocks)
             both give hidden_states (batch, tokens, dim)
    hidden_states -> CloudHalf.generate (rest of the vision tower, projector, language model)

The batch generates ``max(max_new_tokens)`` tokens; each answer is cut at its own limit and at EOS.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from edge_client.bundle import EdgeBundle
from edge_client.preprocess import MAX_IMAGE_PIXELS, preprocess
from edge_client.protocol import VQARequest
from models.export import export_edge_bundle
from models.prompt import encode_prompts
from models.quantizer import AlignedVQ
from models.registry import LoadedModel, load_model
from models.split import split_llava

from ..errors import UnknownModel
from ..served_models import ModelInfo
from ..validation import StreamValidator, check_image

__all__ = ["Prepared", "Runner", "resolve_device", "resolve_dtype"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved


def _present(array: np.ndarray | None) -> np.ndarray:
    # Callers pick the items whose array is set; a coded item has stats whenever the quantizer has
    # stat_bits, since validation requires a stream's stat_bits to equal the served quantizer's.
    assert array is not None
    return array


@dataclass(frozen=True, eq=False)
class Prepared:
    """One request ready for compute.

    ``indices`` (tokens, G, S) uint16 and ``stats`` (tokens, 2) or None for a feature stream;
    ``pixel_values`` (3, H, W) float32 for a cloud-only image.
    """

    question: str
    max_new_tokens: int
    indices: np.ndarray | None = None
    stats: np.ndarray | None = None
    pixel_values: np.ndarray | None = None


class Runner:
    """One served model + quantizer; see the module docstring."""

    def __init__(
        self, loaded: LoadedModel, quantizer: AlignedVQ, quantizer_name: str, device: str, fused: bool = False
    ) -> None:
        self.loaded = loaded
        self.quantizer = quantizer.to(device).eval()
        self.device = device
        self.edge, self.cloud = split_llava(loaded.model, quantizer.config.site, fused=fused)
        self.bundle = export_edge_bundle(loaded, quantizer)
        # What gateways validate against is read back from the bundle edges receive, so the two
        # can never disagree.
        parsed = EdgeBundle.from_bytes(self.bundle)
        self.info = ModelInfo(
            name=loaded.name,
            quantizer=quantizer_name,
            split_site=parsed.split_site,
            tokens=parsed.tokens,
            groups=parsed.groups,
            stages=parsed.stages,
            codebook_size=parsed.codebook_size,
            code_dim=parsed.code_dim,
            stat_bits=parsed.stat_bits,
            codebook_hash=parsed.codebook_hash,
            bundle_sha256=parsed.sha256,
            bundle_bytes=parsed.nbytes,
            image_size=parsed.image_spec.size,
        )
        self.streams = StreamValidator(self.info, self.info.codebook_hash, parsed.freqs, parsed.ranking)
        self.eos_token_id = loaded.tokenizer.eos_token_id

    @classmethod
    def load(
        cls,
        model: str,
        quantizer: str,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        fused: str = "auto",
    ) -> Runner:
        """Load ``model`` (registry name or directory) and its quantizer ``quantizer`` (file stem).

        ``fused``: ``auto`` decodes with :mod:`models.fused` on CUDA devices, ``on``/``off`` force it.
        """
        if threads:
            torch.set_num_threads(threads)
        # numpy's BLAS only serves stream decoding here (small neighbour-rank GEMMs, one request at
        # a time); its threads would fight torch's for the same cores (3-10x slower decodes).
        threadpool_limits(limits=1, user_api="blas")
        device = resolve_device(device)
        loaded = load_model(model, device=device, dtype=resolve_dtype(dtype, device))
        vq = AlignedVQ.load(loaded.quantizer_path(quantizer), map_location=device)
        use_fused = fused == "on" or (fused == "auto" and device.startswith("cuda"))
        return cls(loaded, vq, quantizer, device, fused=use_fused)

    def prepare(self, request: VQARequest) -> Prepared:
        """Decode one request into model inputs, with the checks of :mod:`gateway.validation` (which
        say why the worker repeats none of them needlessly); raises the same 4xx as the gateway."""
        if request.model != self.info.name:
            raise UnknownModel(f"this worker serves {self.info.name!r}, got a request for {request.model!r}")
        if request.features is not None:
            decoded = self.streams.decode(request.model, request.features)
            return Prepared(request.question, request.max_new_tokens, decoded.indices, decoded.stats)
        assert request.image is not None
        image = check_image(request.image, MAX_IMAGE_PIXELS)
        return Prepared(
            request.question,
            request.max_new_tokens,
            pixel_values=preprocess(image, self.loaded.image_spec),
        )

    @torch.inference_mode()
    def hidden_states(self, items: list[Prepared]) -> torch.Tensor:
        """``(batch, tokens, dim)`` at the split site, in batch order."""
        rows: dict[int, torch.Tensor] = {}
        coded = [i for i, item in enumerate(items) if item.indices is not None]
        if coded:
            indices = torch.from_numpy(np.stack([_present(items[i].indices) for i in coded]).astype(np.int64))
            levels = None
            if self.quantizer.config.stat_bits:
                levels = torch.from_numpy(
                    np.stack([_present(items[i].stats) for i in coded]).astype(np.int64)
                )
                levels = levels.to(self.device)
            decoded = self.quantizer.decode(indices.to(self.device), levels)
            rows.update(zip(coded, decoded, strict=True))
        images = [i for i, item in enumerate(items) if item.pixel_values is not None]
        if images:
            pixels = torch.from_numpy(np.stack([_present(items[i].pixel_values) for i in images])).to(
                self.device
            )
            rows.update(zip(images, self.edge(pixels), strict=True))
        dtype = next(self.cloud.parameters()).dtype
        return torch.stack([rows[i].to(dtype) for i in range(len(items))])

    def warmup(self, batch: int) -> float:
        """Answer one synthetic full batch (valid random codes); returns its wall time in ms."""
        rng = np.random.default_rng(0)
        c = self.quantizer.config
        shape = (self.info.tokens, c.groups, c.stages)
        items = [
            Prepared(
                "what color is the shape?",
                2,
                rng.integers(0, c.codebook_size, size=shape, dtype=np.uint16),
                rng.integers(0, 2**c.stat_bits, size=(self.info.tokens, 2), dtype=np.uint16)
                if c.stat_bits
                else None,
            )
            for _ in range(batch)
        ]
        started = time.perf_counter()
        self.run(items)
        return (time.perf_counter() - started) * 1000

    @torch.inference_mode()
    def run(self, items: list[Prepared]) -> list[str]:
        """Answers for a batch, one generate call."""
        hidden = self.hidden_states(items)
        input_ids, attention_mask = encode_prompts(
            self.loaded.tokenizer, self.loaded.prompt, [item.question for item in items]
        )
        new_tokens = self.cloud.generate(
            hidden,
            input_ids.to(self.device),
            attention_mask.to(self.device),
            max_new_tokens=max(item.max_new_tokens for item in items),
        )
        answers = []
        for row, item in zip(new_tokens.tolist(), items, strict=True):
            row = row[: item.max_new_tokens]
            if self.eos_token_id in row:
                row = row[: row.index(self.eos_token_id)]
            # One sequence of ids decodes to one string (transformers types decode for batches too).
            answer = cast(str, self.loaded.tokenizer.decode(row, skip_special_tokens=True))
            answers.append(answer.strip())
        return answers
