"""Data: disjoint easy-VQA splits, template-true generated questions, a vocabulary that covers all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.data import ANSWERS, TEMPLATES, generate_shapes, load_easy_vqa
from models.mini import build_tokenizer
from models.registry import ModelNotAvailable, load_model_dir, write_manifest


def test_holdout_is_carved_from_train_and_test_is_separate() -> None:
    train, holdout, test = (load_easy_vqa(s) for s in ("train", "holdout", "test"))
    assert len(train) + len(holdout) == 38575 and len(test) == 9673
    assert len(train.images) == 3600 and len(holdout.images) == 400
    assert not {img.tobytes() for img in holdout.images[:50]} & {
        img.tobytes() for img in train.images[:3600:9]
    }


def test_generated_answers_are_consistent() -> None:
    data = generate_shapes(40, seed=5)
    assert data.images.shape == (40, 64, 64, 3) and len(data) == 320
    for q, (a,) in zip(data.questions, data.answers, strict=True):
        assert a in ANSWERS
        if q.startswith("what color"):
            assert a in ("red", "green", "blue", "yellow", "teal", "brown", "gray", "black")
    templates = {t for t, _, _ in TEMPLATES}
    assert len(templates) == 24


def test_tokenizer_covers_every_easy_vqa_question_and_answer() -> None:
    tok = build_tokenizer()
    for split in ("train", "test"):
        data = load_easy_vqa(split)
        for text in set(data.questions) | set(ANSWERS):
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_manifest_catches_a_changed_file(tmp_path: Path) -> None:
    src = Path(__file__).parents[2] / "models" / "bundled" / "llava-mini-shapes"
    copy = tmp_path / "m"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("quantizers", "*.jsonl"))
    write_manifest(copy)
    config = (copy / "config.json").read_text()
    (copy / "config.json").write_text(config.replace("64", "65", 1))
    with pytest.raises(ModelNotAvailable, match="config.json does not match its sha256"):
        load_model_dir(copy)
