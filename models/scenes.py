"""``scenes``: multi-object VQA on textured backgrounds, where small objects and their positions matter.

Deterministic by seed (image ``i`` of seed ``s`` depends on ``(s, i)`` alone, so any slice can be
drawn in parallel). Each 128x128 RGB scene has a light, textured background (a two-colour gradient,
low-frequency blotches and per-pixel noise) and 2 to 6 non-overlapping objects: circle, square or
triangle, in one of easy-VQA's eight colours (each channel jittered by up to +-20), small (radius
5-6.5 px) or large (10-13 px). Every answer is one word, except the ``describe`` family's sentence.
The grammar is published in README.md (Models, ``llava-mini-scenes``); :data:`FAMILIES` lists the families.

Only numpy and Pillow: load generators and tests use it without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from . import data
from .data import VQASplit

SIZE = 128
SHAPES = ("circle", "square", "triangle")
# easy-VQA's eight colours (same RGB values), in the order the generator draws them by index.
COLORS = {
    name: data.COLORS[name] for name in ("red", "green", "blue", "yellow", "black", "gray", "brown", "teal")
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
RADIUS = {"small": (5.0, 6.5), "large": (10.0, 13.0)}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")
# The families the accuracy bars cover; ``describe`` (a sentence) is reported beside them.
FAMILIES = ("exist", "count", "query", "closest", "relate", "compare")
DESCRIBE = "describe the image"
# A referent's two nearest neighbours closer than this (px, centre distance) make "closest" ambiguous.
CLOSEST_MARGIN = 4.0
RELATE_MIN_DX = 3.0  # "left of" needs centres further apart than this horizontally
# Shape extents as multiples of the radius: square half-side, triangle circumradius; the bounding
# radius (centre to farthest point) keeps objects apart.
SQUARE_HALF = 0.85
TRIANGLE_R = 1.15
BOUND = {"circle": 1.0, "square": SQUARE_HALF * math.sqrt(2), "triangle": TRIANGLE_R}
GAP = 2.0  # px between the bounding circles of two objects
SUPERSAMPLE = 4
# Object records: (cx, cy, colour index, shape index, size index, radius); rows past the count are -1.
MAX_OBJECTS = 6
OBJECT_FIELDS = 6


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float

    def bound(self) -> float:
        return BOUND[self.shape] * self.radius

    def as_row(self) -> list[float]:
        return [
            self.cx,
            self.cy,
            COLOR_NAMES.index(self.color),
            SHAPES.index(self.shape),
            SIZES.index(self.size),
            self.radius,
        ]


def _background(rng: np.random.Generator) -> np.ndarray:
    """Light and never flat: gradient + low-frequency blotches + per-pixel noise, ``(H, W, 3)`` float."""
    c0, c1 = rng.uniform(190, 250, 3), rng.uniform(190, 250, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = c0 * (1 - t) + c1 * t
    grid = rng.integers(128 - 18, 128 + 19, (6, 6, 3), dtype=np.uint8)
    blotches = np.asarray(Image.fromarray(grid).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float64)
    return base + (blotches - 128.0) + rng.normal(0.0, 6.0, (SIZE, SIZE, 3))


def _coverage(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Fraction of each pixel inside ``obj``, from a supersampled point test on its bounding box."""
    dx, dy = np.broadcast_arrays(xs - obj.cx, ys - obj.cy)
    r = obj.radius
    if obj.shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif obj.shape == "square":
        h = SQUARE_HALF * r
        inside = (np.abs(dx) <= h) & (np.abs(dy) <= h)
    else:  # upward equilateral triangle with its centroid at the centre
        big = TRIANGLE_R * r
        inside = np.ones_like(dx, dtype=bool)
        for k in range(3):
            a = -math.pi / 2 + k * 2 * math.pi / 3 + math.pi  # outward normal of the edge opposite vertex k
            inside &= dx * math.cos(a) + dy * math.sin(a) <= big / 2
    s = SUPERSAMPLE
    return inside.reshape(inside.shape[0] // s, s, inside.shape[1] // s, s).mean(axis=(1, 3))


def _place(rng: np.random.Generator) -> list[SceneObject]:
    count = int(rng.integers(2, MAX_OBJECTS + 1))
    placed: list[SceneObject] = []
    for _ in range(200):
        if len(placed) == count:
            break
        size = SIZES[int(rng.integers(2))]
        shape = SHAPES[int(rng.integers(3))]
        radius = float(rng.uniform(*RADIUS[size]))
        extent = BOUND[shape] * radius
        cx, cy = rng.uniform(extent + 1, SIZE - 1 - extent, 2)
        obj = SceneObject(shape, COLOR_NAMES[int(rng.integers(8))], size, float(cx), float(cy), radius)
        if all(math.dist((cx, cy), (o.cx, o.cy)) >= extent + o.bound() + GAP for o in placed):
            placed.append(obj)
    return placed


def draw_scene(seed: int, index: int) -> tuple[np.ndarray, list[SceneObject]]:
    """Scene ``index`` of ``seed``: ``(128, 128, 3)`` uint8 and its objects."""
    rng = np.random.default_rng([seed, index])
    image = _background(rng)
    objects = _place(rng)
    s = SUPERSAMPLE
    for obj in objects:
        x0, x1 = int(obj.cx - obj.bound()) - 1, int(obj.cx + obj.bound()) + 2
        y0, y1 = int(obj.cy - obj.bound()) - 1, int(obj.cy + obj.bound()) + 2
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, SIZE), min(y1, SIZE)
        sub = (np.arange(s) + 0.5) / s
        xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1)
        ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1)
        alpha = _coverage(obj, xs[None, :], ys[:, None])[..., None]
        colour = np.clip(np.asarray(COLORS[obj.color], np.float64) + rng.integers(-20, 21, 3), 0, 255)
        image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - alpha) + colour * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


# ---- questions ---------------------------------------------------------------------------------


def _plural(shape: str) -> str:
    return shape + "s"


def _unique(objects: list[SceneObject], color: str, shape: str | None = None) -> SceneObject | None:
    hits = [o for o in objects if o.color == color and (shape is None or o.shape == shape)]
    return hits[0] if len(hits) == 1 else None


def describe(objects: list[SceneObject]) -> str:
    """``a large red circle , a small blue square and a small teal triangle``, left to right."""
    parts = [f"a {o.size} {o.color} {o.shape}" for o in sorted(objects, key=lambda o: o.cx)]
    return " , ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def ask(family: str, objects: list[SceneObject], rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of ``family`` about ``objects``, or None when the scene has none valid."""
    present = sorted({o.color for o in objects})
    if family == "exist":
        if rng.random() < 0.5:
            o = objects[int(rng.integers(len(objects)))]
            color, shape = o.color, o.shape
        else:
            color, shape = COLOR_NAMES[int(rng.integers(8))], SHAPES[int(rng.integers(3))]
        hit = any(o.color == color and o.shape == shape for o in objects)
        return f"is there a {color} {shape}?", "yes" if hit else "no"
    if family == "count":
        if rng.random() < 0.5:
            shape = SHAPES[int(rng.integers(3))]
            return f"how many {_plural(shape)} are there?", NUMBERS[sum(o.shape == shape for o in objects)]
        color = (
            present[int(rng.integers(len(present)))]
            if rng.random() < 0.6
            else COLOR_NAMES[int(rng.integers(8))]
        )
        return f"how many {color} shapes are there?", NUMBERS[sum(o.color == color for o in objects)]
    if family == "query":
        if rng.random() < 0.5:
            pairs = [o for o in objects if _unique(objects, o.color, o.shape) is o]
            if pairs:
                o = pairs[int(rng.integers(len(pairs)))]
                return f"what size is the {o.color} {o.shape}?", o.size
        colours = [c for c in present if _unique(objects, c) is not None]
        if not colours:
            return None
        color = colours[int(rng.integers(len(colours)))]
        return f"what shape is the {color} object?", _unique(objects, color).shape  # type: ignore[union-attr]
    if family == "closest":
        refs = [o for o in objects if _unique(objects, o.color, o.shape) is o]
        rng.shuffle(refs)  # type: ignore[arg-type]
        for ref in refs:
            others = sorted(
                (math.dist((ref.cx, ref.cy), (o.cx, o.cy)), i) for i, o in enumerate(objects) if o is not ref
            )
            if len(others) > 1 and others[1][0] - others[0][0] < CLOSEST_MARGIN:
                continue
            return f"what color is the object closest to the {ref.color} {ref.shape}?", objects[
                others[0][1]
            ].color
        return None
    if family == "relate":
        refs = [o for o in objects if _unique(objects, o.color, o.shape) is o]
        pairs = [(a, b) for a in refs for b in refs if a is not b and abs(a.cx - b.cx) > RELATE_MIN_DX]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"is the {a.color} {a.shape} left of the {b.color} {b.shape}?", "yes" if a.cx < b.cx else "no"
    if family == "compare":
        pool = present if len(present) >= 2 and rng.random() < 0.7 else list(COLOR_NAMES)
        i, j = rng.choice(len(pool), 2, replace=False)
        c1, c2 = pool[int(i)], pool[int(j)]
        more = sum(o.color == c1 for o in objects) > sum(o.color == c2 for o in objects)
        return f"are there more {c1} shapes than {c2} shapes?", "yes" if more else "no"
    if family == "describe":
        return DESCRIBE, describe(objects)
    raise ValueError(f"unknown scenes family {family!r}; expected one of {(*FAMILIES, 'describe')}")


@dataclass(frozen=True)
class SplitPlan:
    """How a named split is drawn: seed, images, questions per image, and the share of describes and
    of multi-turn conversations (earlier question-answer turns before the one that is scored)."""

    seed: int
    images: int
    questions_per_image: int
    describe_share: float = 0.0
    history_share: float = 0.0
    relational_weight: int = 1  # how many rotation slots "closest" and "relate" get (train: the hard ones)


# Test and holdout seeds are committed: anyone regenerates the same questions.
SPLITS = {
    "train": SplitPlan(
        seed=1,
        images=100_000,
        questions_per_image=8,
        describe_share=0.06,
        history_share=0.15,
        relational_weight=2,
    ),
    "holdout": SplitPlan(seed=2, images=1_000, questions_per_image=7),
    "test": SplitPlan(seed=3, images=3_000, questions_per_image=7),
}
TURN_SEPARATOR = " answer : {answer} </s> "  # between turns, matching the mini prompt template


def _questions(objects: list[SceneObject], plan: SplitPlan, rng: np.random.Generator):
    """``questions_per_image`` (question, answer, family) rows, families in rotation from a random start."""
    rows: list[tuple[str, str, str]] = []
    bare: list[tuple[str, str]] = []  # the rows without their history, for later turns to quote
    rotation = [
        f for f in FAMILIES for _ in range(plan.relational_weight if f in ("closest", "relate") else 1)
    ]
    start = int(rng.integers(len(rotation)))
    attempts = 0
    while len(rows) < plan.questions_per_image and attempts < 4 * plan.questions_per_image:
        family = rotation[(start + attempts) % len(rotation)]
        if rng.random() < plan.describe_share and all(f != "describe" for _, _, f in rows):
            family = "describe"
        attempts += 1
        qa = ask(family, objects, rng)
        if qa is None:
            continue
        question, answer = qa
        if bare and rng.random() < plan.history_share:
            earlier = bare[int(rng.integers(len(bare)))]
            question = earlier[0] + TURN_SEPARATOR.format(answer=earlier[1]) + question
        bare.append(qa)
        rows.append((question, answer, family))
    return rows


def generate_scenes(plan: SplitPlan, start: int = 0, stop: int | None = None) -> VQASplit:
    """Images ``start..stop`` of ``plan`` with their questions, families and object records."""
    stop = plan.images if stop is None else stop
    images, questions, answers, index, families = [], [], [], [], []
    objects = np.full((stop - start, MAX_OBJECTS, OBJECT_FIELDS), -1.0, np.float32)
    for n, i in enumerate(range(start, stop)):
        image, objs = draw_scene(plan.seed, i)
        images.append(image)
        objects[n, : len(objs)] = [o.as_row() for o in objs]
        rng = np.random.default_rng([plan.seed, i, 1])
        for question, answer, family in _questions(objs, plan, rng):
            questions.append(question)
            answers.append([answer])
            index.append(n)
            families.append(family)
    return VQASplit(
        np.stack(images),
        questions,
        answers,
        np.array(index, dtype=np.int64),
        families=families,
        objects=objects,
    )


def load_scenes(split: str, limit_images: int | None = None, workers: int = 1) -> VQASplit:
    """A named split (``train``, ``holdout``, ``test``), drawn in ``workers`` processes."""
    if split not in SPLITS:
        raise ValueError(f"unknown scenes split {split!r}; expected one of {sorted(SPLITS)}")
    plan = SPLITS[split]
    total = plan.images if limit_images is None else min(limit_images, plan.images)
    if workers <= 1:
        return generate_scenes(plan, 0, total)
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, total, 4 * workers + 1).astype(int)
    with ProcessPoolExecutor(workers) as pool:
        parts = list(pool.map(generate_scenes, [plan] * (len(bounds) - 1), bounds[:-1], bounds[1:]))
    return VQASplit.concat(parts)


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order (the tokenizer's vocabulary)."""
    words = [
        "is",
        "there",
        "a",
        "how",
        "many",
        "shapes",
        "are",
        "what",
        "size",
        "the",
        "shape",
        "object",
        "color",
        "closest",
        "to",
        "left",
        "of",
        "more",
        "than",
        "describe",
        "image",
        "?",
        ",",
        "and",
        "answer",
        ":",
    ]
    words += [*SHAPES, *(_plural(s) for s in SHAPES), *COLOR_NAMES, *SIZES, *NUMBERS, "yes", "no"]
    return list(dict.fromkeys(words))
