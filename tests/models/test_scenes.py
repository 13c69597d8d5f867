"""The scenes generator: deterministic, answers true to the scene, skip rules honoured."""

from __future__ import annotations

import re

import numpy as np
import pytest

from models.mini import SCENES
from models.scenes import (
    CLOSEST_MARGIN,
    FAMILIES,
    SPLITS,
    SceneObject,
    ask,
    draw_scene,
    generate_scenes,
    load_scenes,
    vocabulary,
)


def obj(shape: str, color: str, cx: float, cy: float = 64.0, size: str = "large") -> SceneObject:
    return SceneObject(shape, color, size, cx, cy, 11.0 if size == "large" else 5.5)


# red circle (left), blue square (middle), red triangle (right), small teal circle below the square
SCENE = [
    obj("circle", "red", 20),
    obj("square", "blue", 64),
    obj("triangle", "red", 110),
    obj("circle", "teal", 64, 100, "small"),
]


def answers(family: str, objects: list[SceneObject], n: int = 200) -> dict[str, str]:
    """Every (question -> answer) that ``ask`` draws for ``family`` over ``n`` seeds."""
    out: dict[str, str] = {}
    for seed in range(n):
        qa = ask(family, objects, np.random.default_rng(seed))
        if qa is not None:
            assert out.setdefault(qa[0], qa[1]) == qa[1], qa  # one answer per question
    return out


def test_splits_are_deterministic_and_the_test_split_is_big_enough() -> None:
    a, b = generate_scenes(SPLITS["test"], 10, 14), generate_scenes(SPLITS["test"], 10, 14)
    assert np.array_equal(a.images, b.images) and a.questions == b.questions and a.answers == b.answers
    assert a.images.shape == (4, 128, 128, 3) and a.images.dtype == np.uint8
    assert not np.array_equal(a.images, generate_scenes(SPLITS["holdout"], 10, 14).images)
    plan = SPLITS["test"]
    assert plan.images >= 3000 and plan.images * plan.questions_per_image >= 20000
    image, objects = draw_scene(3, 0)
    assert 2 <= len(objects) <= 6 and image[..., :].std() > 5  # textured, never flat


def test_objects_never_overlap_and_sizes_follow_the_grammar() -> None:
    for i in range(30):
        _, objects = draw_scene(5, i)
        for k, o in enumerate(objects):
            assert 5 <= o.radius <= 13 and (o.size == "small") == (o.radius < 8)
            for p in objects[k + 1 :]:
                assert np.hypot(o.cx - p.cx, o.cy - p.cy) > o.radius + p.radius


def test_answers_on_a_hand_made_scene() -> None:
    assert answers("exist", SCENE)["is there a blue square?"] == "yes"
    assert answers("exist", SCENE).get("is there a blue circle?", "no") == "no"
    count = answers("count", SCENE)
    assert count["how many circles are there?"] == "two"
    assert count["how many red shapes are there?"] == "two"
    query = answers("query", SCENE)
    assert query["what shape is the blue object?"] == "square"
    assert query["what size is the teal circle?"] == "small"
    assert "what shape is the red object?" not in query  # red is not unique
    relate = answers("relate", SCENE)
    assert relate["is the red circle left of the blue square?"] == "yes"
    assert relate["is the red triangle left of the red circle?"] == "no"
    compare = answers("compare", SCENE)
    assert compare.get("are there more red shapes than blue shapes?", "yes") == "yes"
    assert compare.get("are there more blue shapes than red shapes?", "no") == "no"
    closest = answers("closest", SCENE)
    assert closest["what color is the object closest to the teal circle?"] == "blue"


def test_skip_rules() -> None:
    # closest: two objects equally near the referent -> no question about that referent
    tie = [obj("circle", "red", 64), obj("square", "blue", 30), obj("square", "green", 98)]
    assert "what color is the object closest to the red circle?" not in answers("closest", tie)
    assert CLOSEST_MARGIN > 0
    # relate: centres 3 px apart or less horizontally -> never compared
    stacked = [obj("circle", "red", 64, 20), obj("square", "blue", 66, 100)]
    assert answers("relate", stacked) == {}
    # query needs a unique referent: two red circles give no size question about them
    twins = [obj("circle", "red", 20), obj("circle", "red", 100)]
    assert answers("query", twins) == {}


def test_every_word_is_in_the_tokenizer_and_every_family_is_asked() -> None:
    data = load_scenes("test", limit_images=60)
    assert set(data.families) == set(FAMILIES)
    assert all(len(a[0].split()) == 1 for a in data.answers)  # test answers are single words
    tok = SCENES.build_tokenizer()
    for text in set(data.questions) | {a[0] for a in data.answers}:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    assert all(re.fullmatch(r"[a-z?:,]+", w) for w in vocabulary())


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scenes split"):
        load_scenes("validation")
