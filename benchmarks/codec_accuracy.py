"""Image codecs at equal bytes: cloud-only accuracy of a bundled model when the picture travels as
PNG, JPEG (quality 90 down to 1), WebP, AVIF (where Pillow has it) or a downscaled JPEG, beside its
AlignedVQ quantizers, all on the same test questions in the same run.

    .venv/bin/python -m benchmarks.codec_accuracy --model llava-mini-scenes --dataset scenes \\
        --device cuda --out benchmarks/results/codec_accuracy_scenes.json

Each codec row is what the gateway's cloud-only path would see: the test image (at the model's
input size) encoded by Pillow, decoded, and resized back to the model's size by the same
``resize_and_crop`` the gateway runs (so a downscaled JPEG is upscaled bicubically in the cloud).
Its size is the mean measured ``POST /v1/vqa`` body (msgpack with request id, model, question and
the ``image`` bytes) over every question. AlignedVQ rows are ``models.evaluate.evaluate`` records
(mean body with the ``features`` stream, header included). ``smallest_codec_at_default_accuracy``
is the smallest codec body whose accuracy reaches the default quantizer's.

A PNG beside the JSON puts both on one rate-accuracy chart (request body bytes, log scale, against
accuracy); ``--plot RESULT.json`` redraws it from a committed result without evaluating anything.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, features

from benchmarks.harness.bodies import request_body
from benchmarks.harness.images import encode_picture
from benchmarks.harness.record import RESULTS, header, write_result
from edge_client.preprocess import resize_and_crop
from models.config import SplitSite
from models.evaluate import evaluate, load_dataset
from models.quantizer import AlignedVQ
from models.store import load_model


def codecs(size: int) -> dict[str, tuple[str, int, dict[str, Any]]]:
    """name -> (Pillow format, encoded side in pixels, save options)."""
    rows: dict[str, tuple[str, int, dict[str, Any]]] = {"png": ("PNG", size, {"optimize": True})}
    rows |= {f"jpeg{q}": ("JPEG", size, {"quality": q}) for q in (90, 75, 50, 30, 20, 10, 5, 1)}
    # Finer steps where the curves cross AlignedVQ's accuracy (between quality 20 and 90).
    webp = (90, 75, 60, 50, 40, 30, 20, 10, 5, 1)
    rows |= {f"webp{q}": ("WEBP", size, {"quality": q, "method": 6}) for q in webp}
    if features.check("avif"):
        rows |= {f"avif{q}": ("AVIF", size, {"quality": q}) for q in (75, 60, 50, 35, 20, 5)}
    for scale in (2, 4):
        rows |= {f"jpeg{q}_1/{scale}": ("JPEG", size // scale, {"quality": q}) for q in (90, 50, 20)}
        rows |= {f"webp{q}_1/{scale}": ("WEBP", size // scale, {"quality": q, "method": 6}) for q in (50, 20)}
    return rows


def transmit(
    image: np.ndarray, fmt: str, side: int, options: dict[str, Any], size: int
) -> tuple[bytes, np.ndarray]:
    """The file the client would send, and the model-sized pixels the gateway decodes from it."""
    picture = Image.fromarray(image)
    if side != picture.width:
        picture = picture.resize((side, side), Image.Resampling.LANCZOS)
    file = encode_picture(np.asarray(picture), fmt, **options)
    return file, resize_and_crop(Image.open(io.BytesIO(file)), size)


def run(
    model: str,
    dataset: str,
    quantizers: list[str],
    limit: int | None,
    device: str,
    only: list[str] | None = None,
) -> dict:
    """``only``: these codecs of the ladder alone (a shorter run where the rest are known to fall
    far short of the quantizers' accuracy); the smallest codec is then chosen among them."""
    loaded = load_model(model, device=device)
    size = loaded.image_spec.size
    ladder = codecs(size)
    unknown = set(only or []) - set(ladder)
    if unknown:
        raise ValueError(f"unknown codecs {sorted(unknown)}; the ladder is {', '.join(ladder)}")
    data = load_dataset(dataset, "test", size).subset(limit)
    used = np.unique(data.image_index)
    result: dict[str, Any] = header("codec_accuracy", device) | {
        "model": model,
        "dataset": dataset,
        "split": "test",
        "n": len(data),
        "images": len(used),
        "device": device,
        "ladder": "full" if only is None else "partial",
        "codecs": [],
        "alignedvq": [],
    }
    for name, (fmt, side, options) in ladder.items():
        if only is not None and name not in only:
            continue
        started = time.perf_counter()
        files, pixels = {}, np.array(data.images)
        for i in used:
            files[int(i)], pixels[i] = transmit(data.images[i], fmt, side, options, size)
        received = replace(data, images=pixels)
        scored = evaluate(loaded, received, dataset, "test", None, SplitSite.parse("preln"), device=device)
        bodies = [
            len(request_body(model, q, image=files[int(i)]))
            for q, i in zip(data.questions, data.image_index, strict=True)
        ]
        row = {
            "name": name,
            "format": fmt,
            "side": side,
            "options": options,
            "file_bytes": float(np.mean([len(f) for f in files.values()])),
            "body_bytes": float(np.mean(bodies)),
            "accuracy": scored["accuracy_original"],
            "seconds": round(time.perf_counter() - started, 1),
        }
        if "accuracy_by_family_original" in scored:
            row["accuracy_by_family"] = scored["accuracy_by_family_original"]
        result["codecs"].append(row)
        print(f"{name:>12} body {row['body_bytes']:8.1f} B  acc {row['accuracy']:.4f}", flush=True)
    for name in quantizers:
        q = AlignedVQ.load(loaded.quantizer_path(name), map_location=device)
        record = evaluate(loaded, data, dataset, "test", q, q.config.site, device=device, with_original=False)
        record["name"] = name
        result["alignedvq"].append(record)
        print(
            f"{name:>12} body {record['payload_bytes']:8.1f} B  acc {record['accuracy_alignedvq']:.4f}",
            flush=True,
        )
    default = result["alignedvq"][0] if result["alignedvq"] else None
    if default is not None:
        reaching = [c for c in result["codecs"] if c["accuracy"] >= default["accuracy_alignedvq"]]
        best = min(reaching, key=lambda c: c["body_bytes"]) if reaching else None
        result["smallest_codec_at_default_accuracy"] = {
            "quantizer": default["name"],
            "quantizer_accuracy": default["accuracy_alignedvq"],
            "quantizer_body_bytes": default["payload_bytes"],
            "codec": None if best is None else best["name"],
            "codec_body_bytes": None if best is None else best["body_bytes"],
            "ratio": None if best is None else best["body_bytes"] / default["payload_bytes"],
        }
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Codecs (one line per format and size, quality falling to the left) and AlignedVQ quantizers
    on one chart of mean request body against accuracy, with lossless PNG's accuracy as a ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families: dict[str, list[dict[str, Any]]] = {}
    full = max(c["side"] for c in result["codecs"])  # the model's size; smaller sides are downscaled
    for row in result["codecs"]:
        label = row["format"] if row["side"] == full else f"{row['format']} at {row['side']} px"
        families.setdefault(label, []).append(row)
    for label, rows in families.items():
        rows = sorted(rows, key=lambda r: r["body_bytes"])
        ax.plot([r["body_bytes"] for r in rows], [100 * r["accuracy"] for r in rows], "o-", ms=4, label=label)
    quantizers = sorted(result["alignedvq"], key=lambda r: r["payload_bytes"])
    ax.plot(
        [r["payload_bytes"] for r in quantizers],
        [100 * r["accuracy_alignedvq"] for r in quantizers],
        "*-",
        color="black",
        ms=10,
        label="AlignedVQ (features)",
    )
    for i, r in enumerate(quantizers):  # alternate label sides: these points sit close together
        name = r["name"].removeprefix("preln-")
        ax.annotate(
            name,
            (r["payload_bytes"], 100 * r["accuracy_alignedvq"]),
            fontsize=6,
            xytext=(6, -8) if i % 2 else (-6, 4),
            ha="left" if i % 2 else "right",
            textcoords="offset points",
        )
    png = next((r for r in result["codecs"] if r["format"] == "PNG"), None)
    if png is not None:
        ax.axhline(100 * png["accuracy"], color="gray", linestyle=":", label="lossless PNG accuracy")
    ax.set_xscale("log")
    ax.set_xlabel("mean POST /v1/vqa body (bytes, measured; log scale)")
    ax.set_ylabel(f"{result['dataset']} test accuracy (%)")
    lowest = min([100 * r["accuracy_alignedvq"] for r in quantizers], default=90.0)
    ax.set_ylim(max(50.0, lowest - 10), 100.5)
    ax.set_title(f"{result['model']}: image codecs vs AlignedVQ, same {result['n']} questions")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-mini-shapes")
    parser.add_argument("--dataset", default="easy-vqa", help="easy-vqa or scenes")
    parser.add_argument("--quantizer", action="append", default=None, help="first = the default")
    parser.add_argument("--limit", type=int, default=None, help="first N test questions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "codec_accuracy.json")
    parser.add_argument("--codec", action="append", default=None, help="only these codecs (repeat)")
    parser.add_argument("--plot", type=Path, default=None, help="only redraw this result's PNG")
    args = parser.parse_args()
    if args.plot is not None:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    started = time.monotonic()
    result = run(args.model, args.dataset, args.quantizer or [], args.limit, args.device, args.codec)
    write_result(result, args.out, started)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result.get("smallest_codec_at_default_accuracy")))


if __name__ == "__main__":
    main()
