"""``edge-client`` against the stub gateway: output formats, environment, exit codes, streamed
answers, the unknown-words note and the ``chat`` loop."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edge_client.cli import app
from edge_client.protocol import decode_request
from tests.edge_client.test_client import StubGateway, export_tiny_bundle

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle_bytes(tiny_model_dir: Path) -> bytes:
    return export_tiny_bundle(tiny_model_dir)


@pytest.fixture
def gateway(bundle_bytes: bytes):
    with StubGateway(bundle_bytes, api_key="k3y") as stub:
        yield stub


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    pixels = np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def _ask(gateway_url: str, photo: Path, tmp_path: Path, *extra: str, **env: str):
    args = [
        "ask",
        str(photo),
        "what shape is it?",
        "--model",
        "llava-tiny",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    return runner.invoke(app, [*args, *extra], env={"VQA_GATEWAY_URL": gateway_url, **env})


def test_ask_json(gateway: StubGateway, photo: Path, tmp_path: Path) -> None:
    result = _ask(gateway.url, photo, tmp_path, "--json", "--max-new-tokens", "4", VQA_API_KEY="k3y")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1
    record = json.loads(result.stdout)
    assert record.keys() >= {
        "answer",
        "request_bytes",
        "model",
        "bits_per_token",
        "edge_ms",
        "latency_ms",
        "cloud_only",
        "request_id",
    }
    assert record["answer"].startswith("features 17 tokens") and record["model"] == "llava-tiny"
    headers, body = gateway.vqa_calls[0]
    assert record["request_bytes"] == len(body) and headers["authorization"] == "Bearer k3y"
    assert record["cloud_only"] is False


def test_ask_human_line_and_options(gateway: StubGateway, photo: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "edge.bundle"
    bundle.write_bytes(gateway.bundle_bytes)
    result = _ask("http://unused.invalid", photo, tmp_path, "--gateway", gateway.url, "--api-key", "k3y",
                  "--bundle", str(bundle), "--cloud-only")  # fmt: skip
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()
    assert first == "image 32x32"
    assert "cloud-only JPEG" in second and "B sent" in second and "bits/token" in second
    assert gateway.bundle_calls == []


@pytest.mark.parametrize(
    ("reply", "exit_code", "message"),
    [
        (
            (400, {"error": {"code": "bad_request", "message": "field 'question': too long"}}, {}),
            2,
            "bad_request",
        ),
        ((500, "worker exploded", {}), 3, "http_500"),
        (
            (503, {"error": {"code": "overloaded", "message": "queue is full"}}, {"Retry-After": "0"}),
            3,
            "overloaded",
        ),
    ],
)
def test_gateway_errors_set_the_exit_code(
    gateway: StubGateway, photo: Path, tmp_path: Path, reply: tuple, exit_code: int, message: str
) -> None:
    gateway.script = [reply]
    result = _ask(gateway.url, photo, tmp_path, "--retries", "0", VQA_API_KEY="k3y")
    assert result.exit_code == exit_code
    assert message in result.stderr and result.stdout == ""


def test_missing_key_is_a_client_error(gateway: StubGateway, photo: Path, tmp_path: Path) -> None:
    result = _ask(gateway.url, photo, tmp_path)
    assert result.exit_code == 2 and "unauthorized" in result.stderr


def test_local_errors_exit_2(gateway: StubGateway, tmp_path: Path) -> None:
    result = _ask(gateway.url, tmp_path / "nope.jpg", tmp_path, VQA_API_KEY="k3y")
    assert result.exit_code == 2 and "cannot read image" in result.stderr
    result = _ask("ftp://example", tmp_path / "nope.jpg", tmp_path)
    assert result.exit_code == 2 and "expected an http(s) gateway URL" in result.stderr


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "WEBP"])
def test_a_truncated_image_is_called_truncated(kind: str, gateway: StubGateway, tmp_path: Path) -> None:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(out, kind)
    path = tmp_path / f"cut.{kind.lower()}"
    path.write_bytes(out.getvalue()[: len(out.getvalue()) // 2])
    result = _ask(gateway.url, path, tmp_path, VQA_API_KEY="k3y")
    assert result.exit_code == 2 and "image is truncated" in result.stderr, result.stderr


def test_a_file_that_is_not_a_bundle_is_named(photo: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bundle-info", str(photo)])
    assert result.exit_code == 2 and "this is not an edge bundle" in result.stderr, result.stderr


def test_unreachable_gateway_exits_3(photo: Path, tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    try:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        result = _ask(url, photo, tmp_path, "--retries", "0", "--timeout", "2")
    finally:
        closed.close()
    assert (
        result.exit_code == 3 and "gateway_unreachable" in result.stderr and "cannot reach" in result.stderr
    )


def test_bundle_info(bundle_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "edge.bundle"
    path.write_bytes(bundle_bytes)
    result = runner.invoke(app, ["bundle-info", str(path)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["format"] == "alignedvq-edge-bundle" and info["model"] == "llava-tiny"
    assert info["split_site"] == "preln" and len(info["sha256"]) == 64 and "tensors" not in info
    result = runner.invoke(app, ["bundle-info", str(path), "--tensors"])
    assert json.loads(result.stdout)["tensors"]["quantizer.codebooks"] == ["float32", [1, 1, 16, 8]]
    path.write_bytes(bundle_bytes[:100])
    result = runner.invoke(app, ["bundle-info", str(path)])
    assert result.exit_code == 2 and "bad_bundle" in result.stderr


def test_module_help_runs_in_a_subprocess() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edge_client.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert "ask" in out.stdout and "bundle-info" in out.stdout


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:8000", "has no scheme; did you mean 'http://127.0.0.1:8000'?"),
        ("http://127.0.0.1:8000/v1/", "ends in /v1; give the base URL ('http://127.0.0.1:8000')"),
    ],
)
def test_gateway_url_mistakes_are_named(url: str, message: str, photo: Path, tmp_path: Path) -> None:
    result = _ask(url, photo, tmp_path, VQA_API_KEY="k3y")
    assert result.exit_code == 2 and message in result.stderr


def test_json_errors_carry_their_code(gateway: StubGateway, photo: Path, tmp_path: Path) -> None:
    result = _ask(gateway.url, photo, tmp_path, "--json")  # no key: the stub gateway says 401
    error = json.loads(result.stdout)["error"]
    assert result.exit_code == 2 and error["code"] == "unauthorized" and error["message"]
    result = _ask("127.0.0.1:1", photo, tmp_path, "--json")
    assert json.loads(result.stdout)["error"]["code"] == "bad_argument"


def test_transparent_pixels_are_composited_on_white(tmp_path: Path) -> None:
    from edge_client.preprocess import load_image, resize_and_crop

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)  # fully transparent black
    rgba[:4, :, :] = (255, 0, 0, 255)  # an opaque red top half
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = np.asarray(load_image(path.read_bytes()))
    assert (pixels[:4] == (255, 0, 0)).all() and (pixels[4:] == 255).all()
    assert (resize_and_crop(Image.fromarray(rgba, "RGBA"), 8)[4:] == 255).all()


def test_ask_stream_prints_the_answer_as_it_comes(gateway: StubGateway, photo: Path, tmp_path: Path) -> None:
    result = _ask(gateway.url, photo, tmp_path, "--stream", VQA_API_KEY="k3y")
    assert result.exit_code == 0, result.output
    answer, summary = result.stdout.splitlines()
    assert answer.startswith("features 17 tokens") and summary.startswith("  [llava-tiny, features")
    assert gateway.vqa_calls[0][0]["accept"] == "text/event-stream"


def test_unknown_words_are_noted_on_stderr_and_in_json(
    gateway: StubGateway, photo: Path, tmp_path: Path
) -> None:
    gateway.unknown_words = ["zorp"]
    result = _ask(gateway.url, photo, tmp_path, "--json", VQA_API_KEY="k3y")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["unknown_words"] == ["zorp"]
    assert "does not know 'zorp'" in result.stderr
    plain = _ask(gateway.url, photo, tmp_path, VQA_API_KEY="k3y")
    assert "does not know 'zorp'" in plain.stderr and "zorp" not in plain.stdout


def test_chat_sends_the_features_once(gateway: StubGateway, photo: Path, tmp_path: Path) -> None:
    args = ["chat", str(photo), "--model", "llava-tiny", "--cache-dir", str(tmp_path / "c")]
    env = {"VQA_GATEWAY_URL": gateway.url, "VQA_API_KEY": "k3y"}
    result = runner.invoke(app, args, input="what shape?\n\nand its color?\n", env=env)
    assert result.exit_code == 0, result.output
    first, second = result.stdout.splitlines()
    assert first == second and first.startswith("features 17 tokens")
    assert "(features)" in result.stderr and "(image_ref)" in result.stderr
    follow_up = decode_request(gateway.vqa_calls[1][1])
    assert follow_up.features is None and follow_up.history == ["what shape?", first]


def test_chat_reports_a_failed_question_and_goes_on(
    gateway: StubGateway, photo: Path, tmp_path: Path
) -> None:
    args = ["chat", str(photo), "--model", "llava-tiny", "--cache-dir", str(tmp_path / "c")]
    gateway.script = [(422, {"error": {"code": "question_too_long", "message": "too long"}}, {})]
    env = {"VQA_GATEWAY_URL": gateway.url, "VQA_API_KEY": "k3y"}
    result = runner.invoke(app, args, input="x\nwhat shape?\n", env=env)
    assert "question_too_long" in result.stderr and "features 17 tokens" in result.stdout
    assert result.exit_code == 2  # not every question was answered
