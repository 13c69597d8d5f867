"""Model side (torch): AlignedVQ, the edge/cloud split of any HF LLaVA, the model store, training, evaluation.

The edge never imports this package; the gateway's worker is its only serving-time user. Names are
resolved lazily (PEP 562), so ``models.data`` (the data sets and the shape generator, numpy only)
can be used by load generators without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "QuantizerConfig": "config",
    "SplitSite": "config",
    "export_edge_bundle": "export",
    "write_edge_bundle": "export",
    "AlignedVQ": "quantizer",
    "QuantizerFileError": "quantizer",
    "DEFAULT_MODEL": "store",
    "DEFAULT_QUANTIZER": "store",
    "LoadedModel": "store",
    "ModelNotAvailable": "store",
    "load_model": "store",
    "CloudHalf": "split",
    "EdgeHalf": "split",
    "split_llava": "split",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
