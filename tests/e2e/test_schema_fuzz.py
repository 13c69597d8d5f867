"""A schema-driven fuzzer nobody here wrote (schemathesis) against a real gateway and worker: every
route in the OpenAPI document, generated valid and invalid requests, with our key. No 5xx, and
every status, content type and body as the document says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.gateway.helpers import API_KEY

from .conftest import REPO, Stack

CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def test_schemathesis_finds_nothing(stack: Stack, tmp_path: Path) -> None:
    stack.worker()
    stack.wait_live(1)
    st = Path(sys.executable).with_name("st")
    command = [str(st), "run", f"{stack.url}/openapi.json", "-H", f"Authorization: Bearer {API_KEY}"]
    command += ["--checks", CHECKS, "--max-examples", "25", "--workers", "1", "--seed", "1"]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parent),
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "NO_COLOR": "1",
    }
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    report = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    assert "passed" in report and "failures" not in report.lower().split("summary")[-1], report
