"""Dependency direction (docs/design.md, "Layers"): the edge client never loads torch or transformers,
and its codec modules load no HTTP stack, imaging or validation library."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the package is run from the checkout, not installed
HEAVY = ("torch", "transformers", "safetensors.torch", "models")


def test_edge_client_imports_no_torch() -> None:
    code = (
        "import json, sys\n"
        "import edge_client, edge_client.cli, edge_client.client, edge_client.encoder, edge_client.bundle\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == []


def test_the_codec_loads_no_http_stack() -> None:
    light = ("httpx", "anyio", "PIL", "pydantic", "safetensors", "msgpack")
    code = (
        "import json, sys\n"
        "import edge_client.bitpack, edge_client.bitstream, edge_client.entropy, edge_client.ranking\n"
        f"print(json.dumps(sorted(m for m in {light!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == []
