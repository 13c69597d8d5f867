"""``alignedvq`` as an operator meets it: a wrong argument is one line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from models.quantizer import AlignedVQ
from models.store import load_model

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
    one_stage = _alignedvq(
        "suppress",
        "--model",
        model,
        "--quantizer",
        "preln-16",
        "--background-norm",
        "9",
        "--threshold",
        "4",
        "--images",
        "8",
    )
    assert one_stage.returncode == 2 and one_stage.stderr.strip().splitlines()[-1] == (
        "error: preln-16 has one stage: suppress a gated multi-stage quantizer"
    )
    usage = _alignedvq("retune", "--model", model)
    assert usage.returncode == 2 and "Missing option" in usage.stderr
    assert _alignedvq("--help").returncode == 0


def test_eval_without_a_quantizer_uses_the_models_own_default() -> None:
    """The scenes model's default is not the shapes model's: ``eval`` asks the model folder."""
    run = _alignedvq(
        "eval",
        "--model",
        "llava-mini-scenes",
        "--dataset",
        "scenes",
        "--split",
        "test",
        "--limit",
        "7",
        "--json",
    )
    assert run.returncode == 0, run.stderr[-500:]
    record = json.loads(run.stdout)
    loaded = load_model("llava-mini-scenes")
    default = AlignedVQ.load(loaded.quantizer_path(loaded.default_quantizer))
    assert record["codebook_hash"] == default.content_hash()
    assert (record["stages"], record["rate_lambda"], record["background_norm"]) == (
        default.config.stages,
        default.config.rate_lambda,
        default.config.background_norm,
    )
    assert record["n"] == 7 and "accuracy_by_family_alignedvq" in record
