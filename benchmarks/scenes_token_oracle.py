"""Where a scenes quantizer loses its answers: exact features on some tokens, its codes on the rest.

    .venv/bin/python -m benchmarks.scenes_token_oracle \
        --out benchmarks/results/raw/scenes_token_oracle_cpu.json
    # ~10 minutes on 2 CPU cores (300 holdout scenes, 2,100 questions)

The edge encodes holdout scenes as it would for the wire (``AlignedVQ.encode``: rate-distortion
optimised indices for a rate-controlled quantizer). The cloud then answers from a mix: on a chosen
set of tokens it gets the exact projected feature (what an infinitely fine code would send), on
the others the codes' reconstruction. A set whose exactness brings the accuracy back to the
unquantized model's holds what the codes lose; one that changes nothing does not matter at this
rate. Token sets: by the residual the codes leave (``|z - zq|^2`` above or below ``--residual``)
and by the projected feature's own size (``|z|^2`` above ``--norm``: object patches; the textured
background stays below). Two more rows send the zero vector (the per-position mean) for every token
within ``--zero-norm`` and, elsewhere, the exact feature or the codes: does the background carry
anything the answers need (``background_norm``, :mod:`benchmarks.scenes_background`)? Also measured:
the unquantized model and the projection alone (every token exact). Holdout only: this chooses
where to spend bits, so it never looks at test.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.harness.record import header, write_result
from models.evaluate import accuracy, accuracy_by_family, answer
from models.quantizer import AlignedVQ
from models.scenes import load_scenes
from models.split import split_llava
from models.store import load_model
from models.train import collect_features


@torch.no_grad()
def run(
    model: str, quantizer: str, images: int, residual: float, norm: float, zero_norm: float = 70.0
) -> dict:
    result = header("scenes_token_oracle")
    loaded = load_model(model)
    holdout = load_scenes("holdout", images)
    q = AlignedVQ.load(loaded.quantizer_path(quantizer))
    edge, cloud = split_llava(loaded.model.eval(), q.config.site)
    x = collect_features(edge, torch.from_numpy(holdout.images), loaded.image_spec)
    standardized, levels = q.standardize(x)
    z = q.project(standardized)
    indices, _ = q.encode(x)
    zq = q.lookup(indices)
    residual2 = ((z - zq) ** 2).sum(-1)  # (images, tokens, groups)
    norm2 = (z**2).sum(-1)
    token_sets = {
        "codes everywhere": torch.zeros_like(residual2, dtype=torch.bool),
        f"exact where |z - zq|^2 > {residual:g}": residual2 > residual,
        f"exact where |z - zq|^2 <= {residual:g}": residual2 <= residual,
        f"exact where |z|^2 > {norm:g} (objects)": norm2 > norm,
        f"exact where |z|^2 <= {norm:g} (background)": norm2 <= norm,
        "exact everywhere (the projection alone)": torch.ones_like(residual2, dtype=torch.bool),
    }
    rows = {}

    def score(hidden: torch.Tensor) -> dict:
        preds = answer(loaded, cloud, hidden, holdout, "cpu")
        by_family = accuracy_by_family(preds, holdout)
        return {"accuracy": accuracy(preds, holdout), "accuracy_by_family": by_family}

    rows["unquantized model"] = score(x) | {"exact_token_share": 1.0}
    for name, exact in token_sets.items():
        mixed = torch.where(exact.unsqueeze(-1), z, zq)
        rows[name] = score(q.reconstruct(mixed, levels)) | {"exact_token_share": exact.float().mean().item()}
        print(f"{name}: {rows[name]['accuracy']:.4f} ({rows[name]['exact_token_share']:.3f} of tokens)")
    background = (norm2 <= zero_norm).unsqueeze(-1)
    for name, rest in (("exact", z), ("codes", zq)):
        row = f"zero where |z|^2 <= {zero_norm:g} (background), {name} elsewhere"
        mixed = torch.where(background, torch.zeros_like(z), rest)
        rows[row] = score(q.reconstruct(mixed, levels)) | {
            "exact_token_share": (~background).float().mean().item() if name == "exact" else 0.0,
            "zero_token_share": background.float().mean().item(),
        }
        print(f"{row}: {rows[row]['accuracy']:.4f} ({rows[row]['zero_token_share']:.3f} of tokens zero)")
    return result | {
        "model": model,
        "quantizer": q.config.name,
        "split": "holdout",
        "images": images,
        "n": len(holdout),
        "residual_threshold": residual,
        "norm_threshold": norm,
        "zero_norm": zero_norm,
        "token_sets": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llava-mini-scenes")
    parser.add_argument("--quantizer", default="", help="default: the model's own default quantizer")
    parser.add_argument("--images", type=int, default=300, help="holdout scenes (7 questions each)")
    parser.add_argument("--residual", type=float, default=10.0, help="squared residual splitting tokens")
    parser.add_argument("--norm", type=float, default=20.0, help="squared projected norm splitting tokens")
    parser.add_argument("--zero-norm", type=float, default=70.0, help="squared projected norm sent as zero")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    started = time.monotonic()
    result = run(args.model, args.quantizer, args.images, args.residual, args.norm, args.zero_norm)
    result = write_result(result, args.out, started)
    print(json.dumps({k: round(v["accuracy"], 4) for k, v in result["token_sets"].items()}, indent=1))


if __name__ == "__main__":
    main()
