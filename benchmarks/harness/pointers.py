"""JSON Pointers (RFC 6901) into result files: how a figure names the raw value it came from."""

from __future__ import annotations

from typing import Any


def pointer(*parts: str | int) -> str:
    """A JSON Pointer from keys and list indices (``~`` and ``/`` escaped as RFC 6901 says)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def resolve(document: Any, path: str) -> Any:
    """The value at JSON Pointer ``path`` in ``document``."""
    node = document
    for raw in path.split("/")[1:]:
        key = raw.replace("~1", "/").replace("~0", "~")
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node
