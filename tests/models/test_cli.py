"""``alignedvq`` as an operator meets it: a wrong argument is one line and exit code 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _alignedvq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "models.cli", *args], capture_output=True, text=True, env=ENV, timeout=120
    )


def test_argument_mistakes_are_one_line_and_exit_2(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = str(shutil.copytree(tiny_model_dir, tmp_path / "llava-tiny"))
    unknown = _alignedvq("retune", "--model", model, "--quantizer", "nope", "--rate-lambda", "2")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    last = unknown.stderr.strip().splitlines()[-1]  # after transformers' progress bar
    assert last == "error: model llava-tiny has no quantizer 'nope'; available: ['preln-16']"
    plain = _alignedvq("retune", "--model", model, "--quantizer", "preln-16", "--rate-lambda", "2")
    assert plain.returncode == 2 and plain.stderr.strip().splitlines()[-1] == (
        "error: preln-16 is not rate-controlled: make a rate-controlled copy with alignedvq rank first"
    )
    usage = _alignedvq("retune", "--model", model)
    assert usage.returncode == 2 and "Missing option" in usage.stderr
    assert _alignedvq("--help").returncode == 0
