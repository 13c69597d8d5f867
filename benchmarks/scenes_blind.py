"""Question-only ("blind") baseline on the scenes test split: how much the image matters.

    .venv/bin/python -m benchmarks.scenes_blind        # ~2 minutes on 2 CPU cores

For every test question, answer with the most frequent training answer of the same question
string (``is there a red circle?`` -> its commonest answer over the train scenes), falling back to
the commonest answer of its family. No image is looked at. Raw JSON:
``benchmarks/results/scenes_blind.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from benchmarks.harness.record import RESULTS, header, write_result
from models.scenes import TURN_SEPARATOR, load_scenes

LAST_TURN = TURN_SEPARATOR.split("{answer}")[-1]


def last_turn(question: str) -> str:
    """The question itself, without any earlier turn quoted before it (train only has those)."""
    return question.rsplit(LAST_TURN, 1)[-1]


def run(train_images: int, workers: int) -> dict:
    result = header("scenes_blind")
    train, test = load_scenes("train", train_images, workers=workers), load_scenes("test")
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_family: dict[str, Counter] = defaultdict(Counter)
    for q, (a,), f in zip(train.questions, train.answers, train.families or [], strict=True):
        by_question[last_turn(q)][a] += 1
        by_family[f][a] += 1
    hits: dict[str, list[bool]] = defaultdict(list)
    for q, (a,), f in zip(test.questions, test.answers, test.families or [], strict=True):
        guess = (by_question.get(q) or by_family[f]).most_common(1)[0][0]
        hits[f].append(guess == a)
    return result | {
        "train_images": train_images,
        "n": len(test),
        "accuracy": float(np.mean([h for v in hits.values() for h in v])),
        "accuracy_by_family": {f: float(np.mean(v)) for f, v in sorted(hits.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scenes_blind.json")
    args = parser.parse_args()
    started = time.monotonic()
    result = write_result(run(args.train_images, args.workers), args.out, started)
    print(json.dumps(result["accuracy_by_family"]), f"overall {result['accuracy']:.4f}")


if __name__ == "__main__":
    main()
