"""Rate-accuracy curve of a bundled model: every quantizer in its folder on a test (or holdout) split.

    .venv/bin/python benchmarks/rate_accuracy.py            # all 9,673 easy-VQA test questions, CPU
    .venv/bin/python benchmarks/rate_accuracy.py --model llava-mini-scenes --dataset scenes \
        --device cuda --out benchmarks/results/rate_accuracy_scenes.json
    .venv/bin/python benchmarks/rate_accuracy.py --limit 500 --out /tmp/ra.json
    .venv/bin/python benchmarks/rate_accuracy.py --quantizer preln-r2x4096-t12-ranked --out /tmp/one.json
    .venv/bin/python benchmarks/rate_accuracy.py --split holdout --out /tmp/h.json ...   # to choose on

Writes raw JSON (machine, versions, date, one record per quantizer: accuracy, nominal bits,
measured stream bytes packed and entropy-coded with the header, msgpack request bytes) and a PNG
drawn from it. Accuracy of the unquantized model is measured in the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.harness.record import RESULTS, header, write_result
from models.evaluate import evaluate, load_dataset
from models.quantizer import AlignedVQ
from models.store import load_model


def run(
    model: str,
    limit: int | None,
    device: str,
    dataset: str = "easy-vqa",
    only: list[str] | None = None,
    split: str = "test",
) -> dict:
    loaded = load_model(model, device=device)
    data = load_dataset(dataset, split, loaded.image_spec.size).subset(limit)
    names = only or sorted(p.stem for p in (loaded.path / "quantizers").glob("*.safetensors"))
    result = header("rate_accuracy", device) | {
        "model": model,
        "dataset": dataset,
        "split": split,
        "device": device,
        "runs": [],
    }
    for i, name in enumerate(names):
        started = time.perf_counter()
        quantizer = AlignedVQ.load(loaded.quantizer_path(name))
        record = evaluate(
            loaded,
            data,
            dataset,
            split,
            quantizer,
            quantizer.config.site,
            device=device,
            with_original=i == 0,
        )
        if "accuracy_original" in record:
            result["accuracy_original"] = record.pop("accuracy_original")
        record.update(name=name, eval_s=round(time.perf_counter() - started, 1))
        result["runs"].append(record)
        print(
            f"{name:>14} {record['bits_per_token']:>3} b/tok  "
            f"entropy {record['bits_per_token_entropy']:6.2f} b/tok  "
            f"acc {record['accuracy_alignedvq']:.4f}  (original {result['accuracy_original']:.4f})",
            flush=True,
        )
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    variable = [r for r in result["runs"] if r.get("ranked") or r.get("refine_threshold")]
    runs = [r for r in result["runs"] if r["site"] == "preln" and r not in variable]
    single = sorted((r for r in runs if r["groups"] == r["stages"] == 1), key=lambda r: r["bits_per_token"])
    ax.plot(
        [r["bits_per_token"] for r in single],
        [100 * r["accuracy_alignedvq"] for r in single],
        "o-",
        label="preln, 1 codebook, packed",
    )
    ax.plot(
        [r["bits_per_token_entropy"] for r in single],
        [100 * r["accuracy_alignedvq"] for r in single],
        "s--",
        label="preln, 1 codebook, entropy-coded (measured)",
    )

    def labelled(x: float, r: dict, offset: tuple[int, int], **style) -> None:
        """One quantizer as a marker at (x, accuracy), annotated with its name."""
        y = 100 * r["accuracy_alignedvq"]
        ax.plot(x, y, **style)
        name = r["name"].removeprefix("preln-")
        ax.annotate(name, (x, y), fontsize=7, xytext=offset, textcoords="offset points")

    for r in runs:
        if r["groups"] > 1 or r["stages"] > 1:
            grouped = r["groups"] > 1
            style = dict(marker="^" if grouped else "v", color="tab:green" if grouped else "tab:red")
            labelled(r["bits_per_token"], r, (3, -8), linestyle="", **style)
    for i, r in enumerate(variable):  # alternate label sides: these points sit close together
        rated = bool(r.get("rate_lambda"))
        label = (
            "gated 2-stage, ranked, rate-distortion optimised (measured bits)"
            if rated
            else "gated 2-stage, neighbour-ranked (measured bits)"
        )
        style = dict(marker="P" if rated else "*", color="tab:brown" if rated else "tab:purple")
        first = next(v for v in variable if bool(v.get("rate_lambda")) == rated) is r
        style.update(markersize=10, linestyle="", label=label if first else None)
        labelled(r["bits_per_token_entropy"], r, (4, 5 if i % 2 else -11), **style)
    for r in result["runs"]:
        if r["site"] == "embed":
            ax.plot(
                r["bits_per_token"],
                100 * r["accuracy_alignedvq"],
                "x",
                color="black",
                markersize=9,
                label="embed (unaligned), 12 bits",
            )
    ax.axhline(100 * result["accuracy_original"], color="gray", linestyle=":", label="unquantized")
    ax.set_xlabel("bits per token (index section; entropy-coded points measured per image)")
    ax.set_ylabel(f"{result['dataset']} {result['split']} accuracy (%)")
    ax.set_title(
        f"{result['model']}: rate vs accuracy ({len(result['runs'])} quantizers, n={result['runs'][0]['n']})"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-mini-shapes")
    parser.add_argument("--dataset", default="easy-vqa", help="easy-vqa or scenes")
    parser.add_argument(
        "--split", default="test", choices=("test", "holdout"), help="holdout: to choose quantizers on"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N questions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: the committed easy-VQA test result")
    parser.add_argument(
        "--quantizer", action="append", default=None, help="only these (repeat); default: every one"
    )
    args = parser.parse_args()
    if args.out is None and (args.split, args.dataset) != ("test", "easy-vqa"):
        parser.error("--out is required unless the run is the easy-VQA test curve (rate_accuracy.json)")
    out = args.out or RESULTS / "rate_accuracy.json"
    started = time.monotonic()
    result = run(args.model, args.limit, args.device, args.dataset, args.quantizer, args.split)
    result = write_result(result, out, started)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
