"""Edge bundles the byte and edge-cost benchmarks measure: the LLaVA-1.5-7B geometry with random
weights (fitted here) and the bundled model with one of its calibrated quantizers. torch is
imported inside the functions: ``edge_cost`` calls them in a child so its own process stays numpy-only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.harness.images import calibration_crops
from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder

LLAVA15_NAME = "llava-1.5-7b"  # registry name: what the stream header and request carry
LLAVA15_QUANTIZER = dict(
    split_site="preln", groups=1, stages=1, codebook_size=4096, code_dim=32, rank_tokens=577
)
MINI_NAME, MINI_QUANTIZER = "llava-mini-shapes", "preln-r2x4096-t12-ranked"
SEED = 0


def llava15_bundle(seed: int = SEED) -> bytes:
    """An edge bundle with LLaVA-1.5-7B edge geometry and random weights (torch, export only).

    The weights are random, so the quantizer is fitted here: k-means codebook, rank geometry and
    rANS tables on :func:`~benchmarks.harness.images.calibration_crops` features (most of the
    time a run of ``wire_bytes`` takes).
    """
    import torch
    from torch import nn
    from transformers import CLIPVisionModel

    from edge_client.preprocess import ImageSpec
    from models.architectures import llava15_geometry_config
    from models.config import QuantizerConfig
    from models.export import export_edge_bundle
    from models.quantizer import AlignedVQ
    from models.store import LLAVA15_PROMPT, LoadedModel

    torch.manual_seed(seed)
    config = llava15_geometry_config(vision_layers=1, text_layers=1)
    vision = config.vision_config

    class VisionOnly(nn.Module):
        """What ``export_edge_bundle`` reads of a LLaVA: ``config`` and ``vision_tower``.

        The 7B text model (13 GB in fp16) is never built: the edge bundle holds nothing of it.
        """

        def __init__(self) -> None:
            super().__init__()
            self.config = config
            self.vision_tower = CLIPVisionModel(vision)

    loaded = LoadedModel(
        name=LLAVA15_NAME,
        model=VisionOnly().eval(),
        tokenizer=None,  # export_edge_bundle never reads it
        prompt=LLAVA15_PROMPT,
        image_spec=ImageSpec(size=vision.image_size),
        path=Path("."),
    )
    quantizer = AlignedVQ(QuantizerConfig(dim=vision.hidden_size, **LLAVA15_QUANTIZER)).eval()
    encoder = EdgeEncoder(EdgeBundle.from_bytes(export_edge_bundle(loaded, quantizer)))
    crops = calibration_crops(vision.image_size, seed)
    features = np.stack([encoder.hidden_states(encoder.pixel_values(crop)) for crop in crops])
    quantizer.init_from_features(torch.from_numpy(features), iters=10, seed=seed)
    quantizer.calibrate(torch.from_numpy(features))
    return export_edge_bundle(loaded, quantizer)


def mini_bundle(quantizer: str = MINI_QUANTIZER) -> bytes:
    """The bundled model's edge bundle with one of its calibrated quantizers (by default the one the
    gateway serves)."""
    from models.export import export_edge_bundle
    from models.quantizer import AlignedVQ
    from models.store import load_model

    loaded = load_model(MINI_NAME)
    return export_edge_bundle(loaded, AlignedVQ.load(loaded.quantizer_path(quantizer)))
