"""Where models live: each bundled folder names the quantizer served when none is asked for."""

from __future__ import annotations

from models.store import DEFAULT_QUANTIZER, load_model


def test_each_bundled_model_serves_its_own_default_quantizer() -> None:
    scenes = load_model("llava-mini-scenes")
    # what `vqa-worker --model llava-mini-scenes` serves
    assert scenes.default_quantizer == "preln-r3x4096-t10-b30"
    assert scenes.quantizer_path().stem == "preln-r3x4096-t10-b30"
    shapes = load_model("llava-mini-shapes")
    assert shapes.default_quantizer == DEFAULT_QUANTIZER and shapes.quantizer_path().is_file()
