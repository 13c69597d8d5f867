"""The token oracle's baseline is the product's own measurement, and its token sets split cleanly."""

import pytest

from benchmarks.scenes_token_oracle import run
from models.evaluate import evaluate
from models.quantizer import AlignedVQ
from models.scenes import load_scenes
from models.store import load_model

QUANTIZER = "preln-r3x4096-t20-l0.5-ranked"


@pytest.mark.slow
def test_oracle_baseline_matches_evaluate_and_sets_are_complements() -> None:
    result = run("llava-mini-scenes", QUANTIZER, images=4, residual=10.0, norm=20.0)
    rows = result["token_sets"]
    loaded = load_model("llava-mini-scenes")
    q = AlignedVQ.load(loaded.quantizer_path(QUANTIZER))
    record = evaluate(loaded, load_scenes("holdout", 4), "scenes", "holdout", q, q.config.site)
    assert result["n"] == record["n"] > 0
    assert rows["codes everywhere"]["accuracy"] == record["accuracy_alignedvq"]
    assert rows["unquantized model"]["accuracy"] == record["accuracy_original"]
    assert rows["codes everywhere"]["exact_token_share"] == 0.0
    assert rows["exact everywhere (the projection alone)"]["exact_token_share"] == 1.0
    for a, b in (
        ("|z - zq|^2 > 10", "|z - zq|^2 <= 10"),
        ("|z|^2 > 20 (objects)", "|z|^2 <= 20 (background)"),
    ):
        shares = rows[f"exact where {a}"]["exact_token_share"] + rows[f"exact where {b}"]["exact_token_share"]
        assert shares == pytest.approx(1.0)
    zero_exact = rows["zero where |z|^2 <= 70 (background), exact elsewhere"]
    assert zero_exact["zero_token_share"] + zero_exact["exact_token_share"] == pytest.approx(1.0)
    assert 0 < zero_exact["zero_token_share"] < 1
