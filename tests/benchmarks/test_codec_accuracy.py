"""The codec ladder: a partial run tries only the codecs asked for and says so."""

from __future__ import annotations

import pytest

from benchmarks.codec_accuracy import run


def test_a_partial_ladder_runs_only_the_named_codecs_beside_the_quantizer() -> None:
    result = run("llava-mini-shapes", "easy-vqa", ["preln-r2x4096-t12-ranked"], 6, "cpu", ["webp40", "png"])
    assert result["ladder"] == "partial"
    assert [row["name"] for row in result["codecs"]] == ["png", "webp40"]  # ladder order
    assert all(row["body_bytes"] > row["file_bytes"] > 0 for row in result["codecs"])
    smallest = result["smallest_codec_at_default_accuracy"]
    assert smallest["quantizer"] == "preln-r2x4096-t12-ranked"
    assert smallest["codec"] in (None, "png", "webp40")


def test_an_unknown_codec_is_named() -> None:
    with pytest.raises(ValueError, match="unknown codecs \\['webp101'\\]"):
        run("llava-mini-shapes", "easy-vqa", [], 6, "cpu", ["webp101"])
