"""Background suppression on scenes: choose a setting on holdout, then measure it on test.

    python -m benchmarks.scenes_background --device cuda --out /tmp/sweep.json --keep /tmp/kept
    # ~1 minute on an H200 (six settings and the test run); CPU: --holdout-limit 2100 --no-test

Scenes spend most of a stream on the textured background, which answers nothing: sending zero for
every token whose projected squared norm is at most 70 and the exact feature elsewhere leaves the
unquantized model's accuracy where it was (:mod:`benchmarks.scenes_token_oracle`, its zero rows).
A background-suppressing quantizer
(:func:`models.recipe.suppressed_quantizer`) sends those tokens as the pinned zero codeword and
spends the bits on the objects. For each ``(background norm, refine threshold)`` setting this
writes such a copy of the model's default quantizer (same projections and codebooks, tables from
training scenes) into a scratch copy of the model folder and measures it on the holdout split;
then the most accurate setting at no more than ``--max-bits`` measured bits per token is measured
on the whole test split, beside the unquantized model, and its file is kept (``--keep``) to ship.
Raw JSON, written after every measurement.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.harness.record import header, write_result
from models.evaluate import evaluate, load_dataset
from models.quantizer import AlignedVQ
from models.recipe import suppressed_quantizer
from models.scenes import load_scenes
from models.store import load_model, load_model_dir

RECORDED = (
    "accuracy_alignedvq",
    "accuracy_by_family_alignedvq",
    "bits_per_token_entropy",
    "stream_bytes_entropy",
    "header_bytes",
    "payload_bytes",
    "codebook_hash",
    "n",
)


def _row(record: dict, **extra: object) -> dict:
    return extra | {k: record[k] for k in RECORDED if k in record}


def run(args: argparse.Namespace, out: Path, started: float) -> dict:
    source = load_model(args.model)
    result = header("scenes_background", args.device) | {
        "model": args.model,
        "base_quantizer": args.base or AlignedVQ.load(source.quantizer_path("")).config.name,
        "max_bits": args.max_bits,
        "calibration_images": args.calibration_images,
        "holdout": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="scenes-background-"))
    try:
        shutil.copytree(source.path, scratch / "model")
        loaded = load_model_dir(scratch / "model", name=source.name, device=args.device)
        calibration = load_scenes("train", args.calibration_images).images
        holdout = load_dataset("scenes", "holdout", loaded.image_spec.size).subset(args.holdout_limit)
        for norm, threshold in args.settings:
            name = suppressed_quantizer(  # the scratch copy may hold a bundled file of that name
                loaded, result["base_quantizer"], calibration, norm, threshold, args.device, overwrite=True
            )
            q = AlignedVQ.load(loaded.quantizer_path(name))
            first = not result["holdout"]
            record = evaluate(
                loaded, holdout, "scenes", "holdout", q, q.config.site, args.device, with_original=first
            )
            if first:
                result["holdout_accuracy_original"] = record["accuracy_original"]
            result["holdout"].append(
                _row(record, name=name, background_norm=norm, refine_threshold=threshold)
            )
            print(
                f"holdout {name}: {record['bits_per_token_entropy']:.2f} b/tok, "
                f"{record['accuracy_alignedvq']:.4f}",
                flush=True,
            )
            write_result(result, out, started)
        within = [r for r in result["holdout"] if r["bits_per_token_entropy"] <= args.max_bits]
        if not within or not args.test:
            return result
        chosen = max(within, key=lambda r: r["accuracy_alignedvq"])
        q = AlignedVQ.load(loaded.quantizer_path(chosen["name"]))
        test = load_dataset("scenes", "test", loaded.image_spec.size).subset(args.test_limit)
        record = evaluate(loaded, test, "scenes", "test", q, q.config.site, args.device)
        result["test"] = _row(record, name=chosen["name"]) | {
            "accuracy_original": record["accuracy_original"],
            "accuracy_by_family_original": record["accuracy_by_family_original"],
        }
        print(
            f"test {chosen['name']}: {record['bits_per_token_entropy']:.2f} b/tok, "
            f"{record['accuracy_alignedvq']:.4f} (original {record['accuracy_original']:.4f})",
            flush=True,
        )
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(loaded.quantizer_path(chosen["name"]), args.keep)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _setting(text: str) -> tuple[float, float]:
    norm, threshold = text.split(":")
    return float(norm), float(threshold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-mini-scenes")
    parser.add_argument("--base", default="", help="quantizer to copy; default: the model's default")
    parser.add_argument(
        "--settings",
        type=_setting,
        nargs="+",
        default=[_setting(s) for s in ("100:30", "100:35", "100:40", "130:30", "130:35", "70:35")],
        help="NORM:THRESHOLD pairs (background squared norm, refine threshold)",
    )
    parser.add_argument("--max-bits", type=float, default=6.0, help="measured bits per token allowed")
    parser.add_argument("--calibration-images", type=int, default=4000)
    parser.add_argument("--holdout-limit", type=int, default=None, help="first N holdout questions")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test questions")
    parser.add_argument("--no-test", dest="test", action="store_false", help="holdout only")
    parser.add_argument("--keep", type=Path, default=None, help="copy the chosen quantizer file here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.monotonic()
    write_result(run(args, args.out, started), args.out, started)


if __name__ == "__main__":
    main()
