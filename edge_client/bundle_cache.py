"""The edge's disk cache of edge bundles: content-addressed files plus a pointer per (gateway, model).

Downloaded bundles live under ``<dir>/bundles/<sha256>.bundle`` with a small JSON index per
(gateway, model); every write is atomic (a rename), and every lookup re-verifies the bundle (tensor
hash, sha256), so a torn or tampered file is a cache miss, never a wrong encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from .bundle import EdgeBundle
from .errors import BundleError

__all__ = ["BundleCache"]


class BundleCache:
    """Content-addressed bundle files plus a per-(gateway, model) pointer to the latest one."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).expanduser()

    def _index(self, gateway_url: str, model: str) -> Path:
        digest = hashlib.sha256(f"{gateway_url}\n{model}".encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model)[:48]
        return self.directory / "index" / f"{safe}-{digest}.json"

    def _bundle(self, sha256: str) -> Path:
        return self.directory / "bundles" / f"{sha256}.bundle"

    def lookup(self, gateway_url: str, model: str) -> EdgeBundle | None:
        """The cached bundle for this gateway and model, verified; None if absent or corrupt."""
        try:
            sha256 = json.loads(self._index(gateway_url, model).read_text())["sha256"]
            if not re.fullmatch(r"[0-9a-f]{64}", sha256):
                return None
            bundle = EdgeBundle.load(self._bundle(sha256))
        except (OSError, ValueError, KeyError, TypeError, BundleError):
            return None
        return bundle if bundle.sha256 == sha256 else None

    def store(self, gateway_url: str, model: str, data: bytes, sha256: str) -> None:
        """Write the bundle file and point the index at it (each write atomic via rename)."""
        atomic_write(self._bundle(sha256), data)
        atomic_write(self._index(gateway_url, model), json.dumps({"model": model, "sha256": sha256}).encode())


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
