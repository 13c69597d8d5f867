"""Model side (torch): AlignedVQ, the edge/cloud split of any HF LLaVA, registry, training, evaluation.

The edge never imports this package; the gateway's worker is its only serving-time user.
"""

from .config import QuantizerConfig, SplitSite
from .export import export_edge_bundle, write_edge_bundle
from .quantizer import AlignedVQ, QuantizerFileError
from .registry import DEFAULT_MODEL, DEFAULT_QUANTIZER, LoadedModel, ModelNotAvailable, load_model
from .split import CloudHalf, EdgeHalf, split_llava

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_QUANTIZER",
    "AlignedVQ",
    "CloudHalf",
    "EdgeHalf",
    "LoadedModel",
    "ModelNotAvailable",
    "QuantizerConfig",
    "QuantizerFileError",
    "SplitSite",
    "export_edge_bundle",
    "load_model",
    "split_llava",
    "write_edge_bundle",
]
