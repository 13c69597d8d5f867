"""The recipe that produces the bundled ``llava-mini-shapes`` model and its rate-accuracy sweep.

Resumable in slices of wall-clock time, so it fits a GPU lease of 10-minute calls:

    alignedvq train-bundled --run runs/bundled --budget-s 540   # repeat until it prints "done"

1. Train the base model from scratch (:func:`models.train.train_mini`): easy-VQA train minus the
   holdout + 40k generated images, 11k steps of batch 256.
2. For each quantizer in :data:`SWEEP`: k-means init + task-aware fine-tuning on train (model
   selection never sees test), then one test-split evaluation recorded in ``rate_accuracy.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import QuantizerConfig
from .data import VQASplit, generate_shapes, load_easy_vqa
from .evaluate import evaluate
from .registry import load_model_dir, write_manifest
from .train import train_mini, train_quantizer

# (split site, groups, stages, codebook size, code dim per group); the default comes first.
SWEEP: tuple[tuple[str, int, int, int, int], ...] = (
    ("preln", 1, 1, 4096, 32),
    ("embed", 1, 1, 4096, 32),  # unaligned baseline at 12 bits
    ("preln", 1, 1, 64, 32),
    ("preln", 1, 1, 256, 32),
    ("preln", 1, 1, 16, 32),
    ("preln", 1, 2, 8, 32),  # residual, 6 bits
    ("preln", 1, 1, 4, 32),
    ("preln", 1, 1, 1024, 32),
    ("preln", 2, 1, 256, 16),  # grouped, 16 bits
    ("preln", 1, 2, 256, 32),  # residual, 16 bits
    ("preln", 1, 3, 16, 32),  # residual, 12 bits
    ("preln", 2, 1, 64, 16),  # grouped, 12 bits
    ("block:2", 1, 1, 4096, 32),  # + 8-bit mean / log-std per token
)


def sweep_configs(dim: int, tokens: int) -> list[QuantizerConfig]:
    return [
        QuantizerConfig(
            dim=dim,
            split_site=site,
            tokens=tokens,
            groups=g,
            stages=s,
            codebook_size=k,
            code_dim=d,
            stat_bits=8 if site.startswith("block") else 0,
        )
        for site, g, s, k, d in SWEEP
    ]


def run_recipe(
    run: Path,
    *,
    budget_s: float,
    device: str,
    base_steps: int = 11000,
    generated_images: int = 40000,
    quantizer_steps: int = 800,
    test_limit: int | None = None,
    sweep_limit: int | None = None,
) -> bool:
    """Advance the recipe by at most ``budget_s`` seconds; returns True once everything is done."""
    started = time.time()
    model_dir = train_mini(
        run / "base",
        steps=base_steps,
        generated_images=generated_images,
        device=device,
        time_budget_s=budget_s,
    )
    if not (model_dir / "manifest.json").is_file():
        return False
    results_path = run / "rate_accuracy.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    done = {r["name"] for r in results["runs"]}
    # The fp16 weights as saved, computed in fp32: the numbers CPU evaluation reproduces.
    loaded = load_model_dir(model_dir, name="llava-mini-shapes", device=device)
    train = VQASplit.concat([load_easy_vqa("train"), generate_shapes(8000, seed=11)])
    holdout, test = load_easy_vqa("holdout"), load_easy_vqa("test").subset(test_limit)
    vision = loaded.model.config.vision_config
    dim, tokens = vision.hidden_size, (vision.image_size // vision.patch_size) ** 2 + 1
    per_config = []
    for config in sweep_configs(dim, tokens)[:sweep_limit]:
        if config.name in done:
            continue
        spent = time.time() - started
        estimate = max(per_config, default=60.0)
        if spent + estimate > budget_s:
            return False
        t0 = time.time()
        path = model_dir / "quantizers" / f"{config.name}.safetensors"
        quantizer = train_quantizer(
            loaded, config, train, holdout, path, steps=quantizer_steps, device=device
        )
        record = evaluate(
            loaded,
            test,
            "easy-vqa",
            "test",
            quantizer,
            config.site,
            device=device,
            with_original=not results["runs"],
        )
        record.update(name=config.name, train_s=round(time.time() - t0, 1))
        if "accuracy_original" in record:
            results["accuracy_original"] = record["accuracy_original"]
        results["runs"].append(record)
        results["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        write_manifest(model_dir)
        per_config.append(time.time() - t0)
    return True
