"""Data: disjoint easy-VQA splits, template-true generated questions, a vocabulary that covers all."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from models.data import ANSWERS, TEMPLATES, generate_shapes, load_easy_vqa
from models.mini import SHAPES
from models.store import ModelNotAvailable, load_model_dir, write_manifest


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
    tok = SHAPES.build_tokenizer()
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


def test_json_vqa_records_load_resized_with_shared_images(tmp_path: Path) -> None:
    import json

    from PIL import Image

    from models.data import load_json_vqa

    Image.new("RGB", (80, 60), (255, 0, 0)).save(tmp_path / "a.png")
    records = [
        {"image": "a.png", "question": "what color is the shape?", "answer": "red"},
        {"image": "a.png", "question": "how many?", "answers": ["two", "2", "two"]},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(records))
    data = load_json_vqa(tmp_path / "vqa.json", 32)
    assert data.images.shape == (1, 32, 32, 3) and data.image_index.tolist() == [0, 0]
    assert data.answers == [["red"], ["two", "2", "two"]]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="record 0 needs image, question and answer"):
        load_json_vqa(tmp_path / "bad.json", 32)


@pytest.mark.slow
def test_alignedvq_train_on_a_json_dataset(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from PIL import Image

    from models.data import generate_shapes

    data = generate_shapes(8, seed=4, questions_per_image=2, size=32)
    for i, img in enumerate(data.images):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    records = [
        {"image": f"{i}.png", "question": q, "answers": a}
        for q, a, i in zip(data.questions, data.answers, data.image_index.tolist(), strict=True)
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "models.cli",
            "train",
            "--model",
            str(tiny_model_dir),
            "--codebook-size",
            "8",
            "--code-dim",
            "4",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--dataset",
            str(tmp_path / "train.json"),
            "--holdout",
            str(tmp_path / "train.json"),
            "--out-dir",
            str(tmp_path / "q"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "q" / "preln-8.safetensors").is_file()


def test_bundled_tokenizers_read_any_case() -> None:
    """Questions are normalised as the training data was written (NFKC, lower case)."""
    from models.store import load_model

    for name in ("llava-mini-shapes", "llava-mini-scenes"):
        tok = load_model(name).tokenizer
        shout, plain = (tok(q)["input_ids"] for q in ("WHAT COLOR IS THE SHAPE?", "what color is the shape?"))
        assert shout == plain and tok.unk_token_id not in plain, name
