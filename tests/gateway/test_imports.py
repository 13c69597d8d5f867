"""Dependency direction (docs/design.md, "Layers"): the HTTP layer never loads torch or ``models``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from gateway.api.main import create_app
from gateway.config import GatewaySettings
from gateway.worker.__main__ import main
create_app(GatewaySettings(_env_file=None, allow_anonymous=True))
code = main(["--check", "--model", "llava-mini-shapes", "--redis-url", "redis://127.0.0.1:1/0"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "models", "transformers"))
print(json.dumps({"heavy": heavy, "check": code}))
"""


def test_api_and_worker_probe_do_not_import_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).parents[2],
        env={"PATH": "/usr/bin:/bin", "VQA_REDIS_TIMEOUT_S": "0.2"},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "check": 1}, out.stderr
