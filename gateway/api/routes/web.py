"""``GET /``: the web edge, a page that encodes photos in the browser and asks ``/v1/vqa``.

The page and its ES modules live in ``edge_client/web`` (the browser twin of the Python edge
client: ``alignedvq.js`` and its WebAssembly kernels); this router serves them, and nothing else:

- ``GET /`` is ``index.html``; ``GET /web/{name}`` one file of that directory whose name and
  suffix are on the allow-list below (no listing, no sub-directories, no traversal), read once and
  kept in memory with its sha256 as ``ETag`` (``Cache-Control: no-cache``: always revalidated, so
  a redeploy reaches every browser, and a 304 costs no body);
- every reply carries ``Content-Security-Policy: default-src 'self'`` (scripts: 'self' plus
  'wasm-unsafe-eval', which compiling the SIMD kernels needs; no inline script or style, no
  third-party origin, no framing), ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy:
  no-referrer``. The page is single-threaded, so no cross-origin isolation (COOP/COEP) is needed.

The API itself is unchanged: the page calls the same ``/v1`` routes with the same API key, sent as
an ``Authorization`` header from ``sessionStorage``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Response

import edge_client

from ...errors import NotFound

__all__ = ["CONTENT_SECURITY_POLICY", "WEB_DIR", "router"]

WEB_DIR = Path(edge_client.__file__).resolve().parent / "web"  # shipped as package data
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'wasm-unsafe-eval'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".wasm": "application/wasm",
}
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")

router = APIRouter(include_in_schema=False, tags=["web"])


@dataclass(frozen=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


_cache: dict[str, _Asset] = {}


def _asset(name: str) -> _Asset:
    """One file of ``WEB_DIR`` by bare name, if its suffix is served; NotFound otherwise."""
    if name in _cache:
        return _cache[name]
    suffix = Path(name).suffix
    path = WEB_DIR / name
    if not _NAME.fullmatch(name) or suffix not in MEDIA_TYPES or not path.is_file():
        raise NotFound(f"no web asset named {name!r}")
    body = path.read_bytes()
    asset = _Asset(body, MEDIA_TYPES[suffix], f'"{hashlib.sha256(body).hexdigest()[:32]}"')
    _cache[name] = asset
    return asset


def _reply(asset: _Asset, if_none_match: str | None) -> Response:
    headers = {**SECURITY_HEADERS, "ETag": asset.etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and asset.etag in {tag.strip() for tag in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/")
async def index(if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The page (``edge_client/web/index.html``)."""
    return _reply(_asset("index.html"), if_none_match)


@router.get("/web/{name}")
async def asset(name: str, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """One static file of the page: its modules, style sheet, kernels and icon."""
    return _reply(_asset(name), if_none_match)
