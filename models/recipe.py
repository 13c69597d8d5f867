"""The recipe that produces the bundled ``llava-mini-shapes`` model and its rate-accuracy sweep.

Resumable in slices of wall-clock time, so it fits a GPU lease of 10-minute calls:

    alignedvq train-bundled --run runs/bundled --budget-s 540   # repeat until it prints "done"

1. Train the base model from scratch (:func:`models.train.train_mini`): easy-VQA train minus the
   holdout + 40k generated images, 11k steps of batch 256.
2. Quantization-aware fine-tuning (``--qat-steps``, 0 to skip): the whole model (edge patch
   embedding included) learns together with the quantizers of :data:`QAT_SWEEP`, in turns with
   unquantized steps, so its features survive 12 bits and fewer while the unquantized path stays
   sharp. (Quantizer-only fine-tuning of a fixed model left the 12-bit default 1.5 points short;
   adapting only the cloud-side vision blocks and projector gained nothing,
   benchmarks/results/rate_accuracy_joint_cloud.json.)
3. The rest of :data:`SWEEP` on that model, quantizer-only: k-means init, then task-aware
   fine-tuning on train in turns; one fixed model serves every rate. Selection never sees test.
4. Variable-rate refinements (:data:`REFINED`, :func:`refine_quantizers`): a gated second stage
   and neighbour-rank entropy coding on top of trained one-stage quantizers (k-means, CPU-cheap),
   with and without rate-distortion optimised index choice (``rate_lambda``).
5. One test-split evaluation per quantizer, recorded in ``rate_accuracy.json``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .config import QuantizerConfig
from .data import VQASplit, generate_shapes, load_easy_vqa, shapes_training_splits
from .evaluate import evaluate
from .mini import SHAPES
from .quantizer import AlignedVQ
from .split import split_llava, vision_tokens
from .store import LoadedModel, load_model_dir, save_model_dir, write_manifest
from .train import collect_features, train_mini, train_quantizers

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


# Learned together with the whole model in step 2, with these turns per rotation (2 unquantized).
QAT_SWEEP: tuple[tuple[tuple[str, int, int, int, int], int], ...] = (
    (SWEEP[0], 2),  # the 12-bit default
    (SWEEP[3], 2),  # preln-256: ~4 bits/token once entropy-coded
    (SWEEP[2], 1),  # preln-64: 6 bits/token before entropy coding
)
QAT_TRAINABLE = ("quantizer", "edge", "vision", "projector", "language")
CLOUD_TRAINABLE = ("adapter", "vision", "projector", "language")
# Step 4: variable-rate, neighbour-ranked refinements of trained one-stage quantizers, as
# (base quantizer, refine_threshold, rate_lambda); thresholds and lambdas chosen on the holdout split
# (the measurements: benchmarks/results/rate_accuracy.json and the README's rate-accuracy table).
REFINED: tuple[tuple[str, float, float], ...] = (
    ("preln-4096", 12.0, 0.0),
    ("preln-4096", 12.0, 0.5),
    ("preln-1024", 24.0, 1.0),
)


@torch.no_grad()
def refine_quantizers(
    loaded: LoadedModel,
    images: np.ndarray,
    rows: tuple[tuple[str, float, float], ...] = REFINED,
    device: str = "cpu",
    iters: int = 20,
    stages: int = 2,
    max_vectors: int = 200000,
) -> list[str]:
    """Write a gated, ranked version of each base quantizer with ``stages`` stages (the base's
    kept, the rest k-means) into the model's folder.

    ``images`` ``(n, H, W, 3)`` uint8 come from training data only: the added stages' k-means and
    the rank tables are fitted on them (on at most ``max_vectors`` token vectors). Rows that differ
    only in ``rate_lambda`` share the added stages (taken from the file when it is there) and differ
    in their tables. Files already there are kept. Returns the quantizer names (the caller rewrites
    the manifest).
    """
    names = []
    feats: dict[str, torch.Tensor] = {}
    second_stages: dict[tuple[str, float], AlignedVQ] = {}
    tokens = vision_tokens(loaded.model.config.vision_config)
    folder = loaded.path / "quantizers"
    for base_name, threshold, rate_lambda in rows:
        base = AlignedVQ.load(loaded.quantizer_path(base_name), map_location=device)
        plain = replace(base.config, stages=stages, refine_threshold=threshold, rank_tokens=tokens)
        config = replace(plain, rate_lambda=rate_lambda)
        names.append(config.name)
        if (folder / f"{config.name}.safetensors").is_file():
            continue
        site = str(base.config.site)
        if site not in feats:
            edge, _ = split_llava(loaded.model.to(device).eval(), base.config.site)
            feats[site] = collect_features(edge, torch.from_numpy(images).to(device), loaded.image_spec)
        if (base_name, threshold) not in second_stages:
            stored = folder / f"{plain.name}.safetensors"
            second_stages[base_name, threshold] = (
                AlignedVQ.load(stored, map_location=device)
                if stored.is_file()
                else AlignedVQ.refined(
                    base,
                    feats[site],
                    refine_threshold=threshold,
                    rank_tokens=tokens,
                    stages=stages,
                    iters=iters,
                    max_vectors=max_vectors,
                )
            )
        q = AlignedVQ(config).to(device).eval()
        q.load_state_dict(second_stages[base_name, threshold].state_dict())
        q.calibrate(feats[site])
        q.save(folder / f"{config.name}.safetensors")
    return names


@torch.no_grad()
def ranked_quantizer(
    loaded: LoadedModel, name: str, images: np.ndarray, rate_lambda: float = 0.0, device: str = "cpu"
) -> str:
    """Write a neighbour-ranked (and, with ``rate_lambda`` > 0, rate-distortion optimised) copy of
    the trained quantizer ``name`` into the model's folder; codebooks unchanged, tables calibrated on
    ``images`` (training data only). Returns its name."""
    base = AlignedVQ.load(loaded.quantizer_path(name), map_location=device)
    tokens = vision_tokens(loaded.model.config.vision_config)
    q = AlignedVQ(replace(base.config, rank_tokens=tokens, rate_lambda=rate_lambda)).to(device).eval()
    result = q.load_state_dict(base.state_dict(), strict=False)  # the rank tables come from calibrate
    if result.unexpected_keys or set(result.missing_keys) - {"rank_books", "rank_offsets"}:
        raise ValueError(f"{name} does not fit a ranked copy of itself: {result}")
    edge, _ = split_llava(loaded.model.to(device).eval(), base.config.site)
    q.calibrate(collect_features(edge, torch.from_numpy(images).to(device), loaded.image_spec))
    q.save(loaded.path / "quantizers" / f"{q.config.name}.safetensors")
    return q.config.name


@torch.no_grad()
def suppressed_quantizer(
    loaded: LoadedModel,
    name: str,
    images: np.ndarray,
    background_norm: float,
    refine_threshold: float,
    device: str = "cpu",
    overwrite: bool = False,
) -> str:
    """Write a background-suppressing copy of the multi-stage quantizer ``name`` (same projections
    and codebooks, code 0 of the first stage pinned to zero, refinement gated at
    ``refine_threshold``), entropy-coded by index frequency; returns its name. A file of that name
    is kept (FileExistsError) unless ``overwrite``: it may be a served quantizer.

    Not neighbour-ranked: a rank is relative to what the neighbours predict, so the one zero
    codeword would get another rank next to every object and the background would cost bits again;
    a plain index table gives it one short code. Tables come from ``images`` (training data only).
    """
    base = AlignedVQ.load(loaded.quantizer_path(name), map_location=device)
    if base.config.stages < 2:
        raise ValueError(f"{name} has one stage: suppress a gated multi-stage quantizer")
    config = replace(
        base.config,
        rank_tokens=0,
        rate_lambda=0.0,
        refine_threshold=refine_threshold,
        background_norm=background_norm,
    )
    target = loaded.path / "quantizers" / f"{config.name}.safetensors"
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"{target} exists; suppress into a copy of the model folder, or remove it first"
        )
    q = AlignedVQ(config).to(device).eval()
    state = {k: v for k, v in base.state_dict().items() if k not in ("rank_books", "rank_offsets")}
    q.load_state_dict(state)
    edge, _ = split_llava(loaded.model.to(device).eval(), config.site)
    q.calibrate(collect_features(edge, torch.from_numpy(images).to(device), loaded.image_spec))
    q.save(target)
    return config.name


def retuned_quantizer(loaded: LoadedModel, name: str, rate_lambda: float) -> str:
    """Write a copy of the rate-controlled quantizer ``name`` that trades rate for error at
    ``rate_lambda`` instead, with the same codebooks *and the same tables*; returns its name.

    A quantizer trained on its own rate-distortion choices (``SCENES_QAT["rdo"]``) has a model that
    reads the codes those tables make cheap; recalibrating them (:func:`ranked_quantizer`) moves
    the choices away from what it learned. Bits are still measured, never assumed: the stream is
    coded with the table it carries, whichever lambda chose its indices.
    """
    base = AlignedVQ.load(loaded.quantizer_path(name))
    if not base.config.rate_lambda:
        raise ValueError(
            f"{name} is not rate-controlled: make a rate-controlled copy with alignedvq rank first"
        )
    if not rate_lambda > 0:
        raise ValueError(
            f"rate_lambda must be > 0 (0 is the nearest search: alignedvq rank), got {rate_lambda}"
        )
    q = AlignedVQ(replace(base.config, rate_lambda=rate_lambda)).eval()
    target = loaded.path / "quantizers" / f"{q.config.name}.safetensors"
    if target.exists():  # the source itself, or a quantizer (perhaps served) of that name
        raise FileExistsError(f"{target} exists; retune into a copy of the model folder, or remove it first")
    q.load_state_dict(base.state_dict())
    q.save(target)
    return q.config.name


def sweep_configs(dim: int, tokens: int = 0, rows: tuple[tuple, ...] = SWEEP) -> list[QuantizerConfig]:
    """Configs from rows ``(site, groups, stages, codebook size, code dim[, refine threshold[,
    rate_lambda]])``; a row with a rate_lambda is neighbour-ranked over ``tokens``."""
    return [
        QuantizerConfig(
            dim=dim,
            split_site=site,
            tokens=tokens,
            groups=g,
            stages=s,
            codebook_size=k,
            code_dim=d,
            refine_threshold=float(rest[0]) if rest else 0.0,
            rank_tokens=tokens if rest[1:] else 0,
            rate_lambda=float(rest[1]) if rest[1:] else 0.0,
        )
        for site, g, s, k, d, *rest in rows
    ]


def run_recipe(
    run: Path,
    *,
    budget_s: float,
    device: str,
    base_steps: int = 11000,
    generated_images: int = 40000,
    qat_steps: int = 3000,
    qat_lr: float = 1e-4,
    quantizer_generated_images: int = 8000,
    quantizer_steps: int = 2000,
    trainable: tuple[str, ...] = ("quantizer",),
    position_centre: bool = False,
    test_limit: int | None = None,
    sweep_limit: int | None = None,
    kmeans_images: int = 4000,
) -> bool:
    """Advance the recipe by at most ``budget_s`` seconds; returns True once everything is done."""
    started = time.time()
    left = lambda: budget_s - (time.time() - started)  # noqa: E731
    model_dir = train_mini(
        run / "base",
        *shapes_training_splits(generated_images),
        steps=base_steps,
        device=device,
        time_budget_s=budget_s,
    )
    if not (model_dir / "manifest.json").is_file():
        return False
    train = VQASplit.concat([load_easy_vqa("train"), generate_shapes(quantizer_generated_images, seed=11)])
    holdout = load_easy_vqa("holdout")
    common = dict(kmeans_images=kmeans_images, device=device, unquantized_turns=2)
    qat = run / "qat"
    if qat_steps:
        if not (qat / "manifest.json").is_file():
            base = load_model_dir(model_dir, name=SHAPES.name, device=device)
            dim = base.model.config.vision_config.hidden_size
            trained = train_quantizers(
                base,
                sweep_configs(dim, rows=tuple(row for row, _ in QAT_SWEEP)),
                train,
                holdout,
                qat / "quantizers",
                steps=qat_steps,
                model_lr=qat_lr,
                turns=[turns for _, turns in QAT_SWEEP],
                trainable=QAT_TRAINABLE,
                time_budget_s=left(),
                **common,
            )
            if trained is None:
                return False
            save_model_dir(base.model, base.tokenizer, base.prompt, base.image_spec, qat)
        model_dir = qat
    final = run / "final"
    if not (final / "manifest.json").is_file():
        source = load_model_dir(model_dir, name=SHAPES.name, device=device)
        vision = source.model.config.vision_config
        tokens = vision_tokens(vision) if position_centre else 0
        learned = {p.name: p for p in (qat / "quantizers").glob("*.safetensors")} if qat_steps else {}
        configs = [
            c
            for c in sweep_configs(vision.hidden_size, tokens)[:sweep_limit]
            if f"{c.name}.safetensors" not in learned
        ]
        if configs:
            trained = train_quantizers(
                source,
                configs,
                train,
                holdout,
                final / "quantizers",
                steps=quantizer_steps,
                turns=[3] + [1] * (len(configs) - 1),  # the first (default or next) rate trains most
                trainable=trainable,
                time_budget_s=left(),
                **common,
            )
            if trained is None:
                return False
        (final / "quantizers").mkdir(parents=True, exist_ok=True)
        for name, path in learned.items():
            shutil.copyfile(path, final / "quantizers" / name)
        save_model_dir(source.model, source.tokenizer, source.prompt, source.image_spec, final)
    rows = tuple(row for row in REFINED if (final / "quantizers" / f"{row[0]}.safetensors").is_file())
    refined = refine_quantizers(
        load_model_dir(final, name=SHAPES.name, device=device), train.images, rows, device=device
    )
    write_manifest(final)
    # Evaluate the model as saved (fp16 weights computed in fp32): the numbers CPU evaluation reproduces.
    results_path = run / "rate_accuracy.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    done = {r["name"] for r in results["runs"]}
    loaded = load_model_dir(final, name=SHAPES.name, device=device)
    test = load_easy_vqa("test").subset(test_limit)
    names = [c.name for c in sweep_configs(1, 1)[:sweep_limit]] + refined
    for name in names:
        if name in done:
            continue
        if left() < 0:
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


# ---- llava-mini-scenes -------------------------------------------------------------------------


@dataclass(frozen=True)
class QatStage:
    """One whole-model QAT stage of the scenes recipe: a rotation of (quantizer row, turns) plus
    unquantized turns, and what a step and the stage's fixed part cost on one H200 (only to fit the
    step count into a lease with ``fit_budget``, where a stage cut by the lease loses everything)."""

    rows: tuple[tuple[tuple, int], ...]
    unquantized_turns: int
    trainable: tuple[str, ...] = QAT_TRAINABLE
    step_s: float = 0.07  # batch 256: 0.047-0.064 s seen across leases, plus a margin
    fixed_s: float = 40  # holdout evaluations before and after, calibration, save (~10 s seen)


# Whole-model QAT stages (edge included), position centred (each token's per-position mean is known
# to both halves and never sent). ``plain`` follows base training (a lease or two); ``gated`` then
# teaches the model the gated two-stage quantizer (objects get a second 12-bit code), started from
# its k-means refinement; ``gated-focus`` continues with three of four steps on that quantizer alone
# (the one-stage 12-bit row is no longer served, and its steps were a fifth of the budget);
# ``gated3-focus`` does the same for a three-stage one (its third stage k-means on the trained
# two-stage quantizer). ``rdo`` trains on what the edge sends: the three-stage quantizer with
# rate-distortion optimised indices at the default's rate (lambda 1) and a low one (lambda 4),
# codebooks and tables fixed (models.rate_search; its search adds ~0.03 s a step); ``rdo-default``
# trains on the default's rate alone (in ``rdo`` the lambda 4 turns cost the default half a point).
# ``rdo-cloud`` and ``rdo-cloud-low`` hold the edge and the quantizers' edge side fixed, so the
# codes are exactly what the edge sends today, and teach only the cloud (the quantizers' ``up`` map
# and everything after it) to read them: at the default's rate, and at it plus a low one.
SCENES_QAT: dict[str, QatStage] = {
    "plain": QatStage(((("preln", 1, 1, 4096, 32), 2), (("preln", 1, 1, 1024, 32), 1)), 3),
    "gated": QatStage(((("preln", 1, 2, 4096, 32, 20.0), 2), (("preln", 1, 1, 4096, 32), 1)), 2),
    "gated-focus": QatStage(((("preln", 1, 2, 4096, 32, 20.0), 3),), 1),
    "gated3-focus": QatStage(((("preln", 1, 3, 4096, 32, 20.0), 3),), 1),
    "rdo": QatStage(
        ((("preln", 1, 3, 4096, 32, 20.0, 1.0), 2), (("preln", 1, 3, 4096, 32, 20.0, 4.0), 2)), 1, step_s=0.12
    ),
    "rdo-default": QatStage(((("preln", 1, 3, 4096, 32, 20.0, 1.0), 3),), 1, step_s=0.12),
    "rdo-cloud": QatStage(
        ((("preln", 1, 3, 4096, 32, 20.0, 1.0), 3),), 1, step_s=0.1, trainable=CLOUD_TRAINABLE
    ),
    "rdo-cloud-low": QatStage(
        ((("preln", 1, 3, 4096, 32, 20.0, 1.0), 2), (("preln", 1, 3, 4096, 32, 20.0, 4.0), 2)),
        1,
        step_s=0.1,
        trainable=CLOUD_TRAINABLE,
    ),
}


def _gated_starts(
    loaded: LoadedModel, configs: list[QuantizerConfig], images: np.ndarray, device: str
) -> None:
    """Write the start of each gated config into the model's folder (where
    :func:`models.train.train_quantizers` finds it), unless it is there already: one more k-means
    stage on the quantizer with one stage fewer (the one-stage base, or the gated one it extends)."""
    folder = loaded.path / "quantizers"
    for config in configs:
        if not config.refine_threshold or (folder / f"{config.name}.safetensors").is_file():
            continue
        if config.rate_lambda:
            raise FileNotFoundError(
                f"{folder} has no {config.name} to start from: make it with alignedvq refine "
                f"(--stages {config.stages} --threshold {config.refine_threshold:g} --rate-lambda "
                f"{config.rate_lambda:g}) first"
            )
        fewer = config.stages - 1
        previous = replace(
            config, stages=fewer, refine_threshold=config.refine_threshold if fewer > 1 else 0.0
        )
        base = AlignedVQ.load(folder / f"{previous.name}.safetensors", map_location=device)
        edge, _ = split_llava(loaded.model.to(device).eval(), config.site)
        feats = collect_features(edge, torch.from_numpy(images).to(device), loaded.image_spec)
        refined = AlignedVQ.refined(
            base, feats, refine_threshold=config.refine_threshold, stages=config.stages
        )
        refined.save(folder / f"{config.name}.safetensors")


def run_scenes_recipe(
    run: Path,
    *,
    budget_s: float,
    device: str,
    base_steps: int = 9000,
    qat_steps: int = 4000,
    qat_lr: float = 2e-4,
    patch_loss_weight: float = 1.0,
    train_images: int | None = None,
    holdout_images: int | None = None,
    workers: int = 1,
    fit_budget: bool = False,
    base_model: Path | None = None,
    qat_stage: str = "plain",
    batch_size: int = 256,
) -> bool:
    """Advance the ``llava-mini-scenes`` recipe by at most ``budget_s``; True once the model and its
    quantization-aware quantizers are in ``run/qat`` (refinement and evaluation are CPU-cheap steps
    of their own, ``alignedvq refine`` and ``benchmarks.rate_accuracy``).

    1. Base training from scratch on generated scenes with the auxiliary per-patch loss.
    2. Quantization-aware fine-tuning of the whole model with the ``qat_stage`` rotation of
       :data:`SCENES_QAT`, keeping the per-patch loss.

    ``base_model``: skip step 1 and fine-tune this model folder instead (its quantizers of the same
    names start step 2, gated ones from a refinement of its one-stage quantizer; the per-patch head
    starts fresh), to continue an earlier run with the next stage.

    ``fit_budget``: cut both stages' steps so that they finish inside ``budget_s`` (timed on the
    machine at hand), for a lease whose calls cannot carry optimizer states from one to the next.
    """
    from .mini import SCENES
    from .patch_loss import PatchHead
    from .scenes import load_scenes

    if qat_stage not in SCENES_QAT:
        raise ValueError(f"unknown QAT stage {qat_stage!r}; choose from {', '.join(SCENES_QAT)}")
    started = time.time()
    left = lambda: budget_s - (time.time() - started)  # noqa: E731
    if (run / "qat" / "manifest.json").is_file():
        return True
    train = load_scenes("train", train_images, workers=workers)
    holdout = load_scenes("holdout", holdout_images)
    # What is left after drawing the data goes ~60:40 to the two stages (QAT steps cost ~1.3 base steps).
    base_share = left() * 0.6
    base = base_model or train_mini(
        run / "base",
        train,
        holdout,
        SCENES,
        steps=base_steps,
        batch_size=batch_size,
        device=device,
        time_budget_s=left(),
        patch_loss_weight=patch_loss_weight,
        fit_budget_s=base_share if fit_budget else None,
    )
    if not (base / "manifest.json").is_file():
        return False
    stage = SCENES_QAT[qat_stage]
    if fit_budget:
        qat_steps = max(1, min(qat_steps, int((left() - stage.fixed_s) / stage.step_s)))
    loaded = load_model_dir(base, name=SCENES.name, device=device)
    vision = loaded.model.config.vision_config
    configs = sweep_configs(
        vision.hidden_size, vision_tokens(vision), rows=tuple(row for row, _ in stage.rows)
    )
    if base_model is not None:
        _gated_starts(loaded, configs, train.images[:20000], device)
    head = PatchHead(vision.hidden_size).to(device)
    if base_model is None:
        head.load_state_dict(torch.load(run / "base" / "patch_head.pt", map_location=device))
    trained = train_quantizers(
        loaded,
        configs,
        train,
        holdout,
        run / "qat" / "quantizers",
        steps=qat_steps,
        batch_size=batch_size,
        model_lr=qat_lr,
        turns=[turns for _, turns in stage.rows],
        unquantized_turns=stage.unquantized_turns,
        trainable=stage.trainable,
        time_budget_s=left(),
        device=device,
        patch_head=head,
        patch_loss_weight=patch_loss_weight,
        init_dir=None if base_model is None else base_model / "quantizers",
    )
    if trained is None:
        return False
    save_model_dir(loaded.model, loaded.tokenizer, loaded.prompt, loaded.image_spec, run / "qat")
    return True
