"""The recipe that produces the bundled ``llava-mini-shapes`` model and its rate-accuracy sweep.

Resumable in slices of wall-clock time, so it fits a GPU lease of 10-minute calls:

    alignedvq train-bundled --run runs/bundled --budget-s 540   # repeat until it prints "done"

1. Train the base model from scratch (:func:`models.train.train_mini`): easy-VQA train minus the
   holdout + 40k generated images, 11k steps of batch 256.
2. All quantizers of :data:`SWEEP` together: k-means init, then task-aware fine-tuning on train
   in turns (the default rate three times as often). By default only the quantizers learn, so one
   unchanged cloud half serves every rate; ``--trainable quantizer,vision,projector`` also adapts
   the cloud (measured: it cost the unquantized model 0.44 points and gained nothing at 12 bits,
   benchmarks/results/rate_accuracy_joint_cloud.json). Selection never sees test.
3. One test-split evaluation per quantizer, recorded in ``rate_accuracy.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import QuantizerConfig
from .data import VQASplit, generate_shapes, load_easy_vqa
from .evaluate import evaluate
from .mini import NAME
from .quantizer import AlignedVQ
from .registry import load_model_dir, save_model_dir
from .split import vision_tokens
from .train import train_mini, train_quantizers

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
)


def sweep_configs(dim: int, tokens: int = 0) -> list[QuantizerConfig]:
    return [
        QuantizerConfig(
            dim=dim, split_site=site, tokens=tokens, groups=g, stages=s, codebook_size=k, code_dim=d
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
    quantizer_steps: int = 3000,
    trainable: tuple[str, ...] = ("quantizer",),
    position_centre: bool = False,
    test_limit: int | None = None,
    sweep_limit: int | None = None,
    kmeans_images: int = 4000,
    quantizer_budget_s: float | None = None,
) -> bool:
    """Advance the recipe by at most ``budget_s`` seconds; returns True once everything is done."""
    started = time.time()
    base_dir = train_mini(
        run / "base",
        steps=base_steps,
        generated_images=generated_images,
        device=device,
        time_budget_s=budget_s,
    )
    if not (base_dir / "manifest.json").is_file():
        return False
    final = run / "final"
    if not (final / "manifest.json").is_file():
        base = load_model_dir(base_dir, name=NAME, device=device)
        vision = base.model.config.vision_config
        tokens = vision_tokens(vision)
        train = VQASplit.concat([load_easy_vqa("train"), generate_shapes(8000, seed=11)])
        configs = sweep_configs(vision.hidden_size, tokens if position_centre else 0)[:sweep_limit]
        train_quantizers(
            base,
            configs,
            train,
            load_easy_vqa("holdout"),
            final / "quantizers",
            steps=quantizer_steps,
            turns=[3] + [1] * (len(configs) - 1),  # the default rate trains three times as often
            time_budget_s=quantizer_budget_s,
            unquantized_turns=2,
            kmeans_images=kmeans_images,
            trainable=trainable,
            device=device,
        )
        save_model_dir(base.model, base.tokenizer, base.prompt, base.image_spec, final)
    # Evaluate the model as saved (fp16 weights computed in fp32): the numbers CPU evaluation reproduces.
    results_path = run / "rate_accuracy.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    done = {r["name"] for r in results["runs"]}
    loaded = load_model_dir(final, name=NAME, device=device)
    test = load_easy_vqa("test").subset(test_limit)
    names = [c.name for c in sweep_configs(1, 1)[:sweep_limit]]
    for name in names:
        if name in done:
            continue
        if time.time() - started > budget_s:
            return False
        quantizer = AlignedVQ.load(loaded.quantizer_path(name), map_location=device)
        record = evaluate(
            loaded,
            test,
            "easy-vqa",
            "test",
            quantizer,
            quantizer.config.site,
            device=device,
            with_original=not results["runs"],
        )
        record["name"] = name
        if "accuracy_original" in record:
            results["accuracy_original"] = record["accuracy_original"]
        results["runs"].append(record)
        results["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    return True
