"""``alignedvq``: train, evaluate and export AlignedVQ models.

alignedvq train-mini --out runs/mini --device cuda
alignedvq train --model llava-mini-shapes --site preln --codebook-size 4096 --out q.safetensors
alignedvq refine --model models/bundled/llava-mini-shapes --base preln-4096 --threshold 12 --rate-lambda 0.5
alignedvq eval --model llava-mini-shapes --dataset easy-vqa --split test --limit 500 --json
alignedvq export --model llava-mini-shapes --quantizer preln-1x4096 --out edge.bundle
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])

Device = Annotated[str, typer.Option(help="torch device: cpu, cuda, cuda:1 ...")]
QuantizerName = Annotated[
    str, typer.Option(help="quantizer name in the model folder, or a file; default: the model's own default")
]


def _load(model: str, quantizer: str):
    """A registry model and one of its quantizers (by name, or any quantizer file)."""
    from .quantizer import AlignedVQ
    from .store import load_model

    loaded = load_model(model)
    path = Path(quantizer) if Path(quantizer).is_file() else loaded.quantizer_path(quantizer)
    return loaded, AlignedVQ.load(path)


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@app.command("train-mini")
def train_mini_cmd(
    out: Annotated[Path, typer.Option(help="run folder (checkpoint, log, final model/)")] = Path("runs/mini"),
    steps: int = 11000,
    batch_size: int = 256,
    lr: float = 5e-4,
    generated_images: Annotated[int, typer.Option(help="extra shape images our generator draws")] = 40000,
    time_budget_s: Annotated[
        float | None, typer.Option(help="pause after a checkpoint; rerun to resume")
    ] = None,
    device: Device = "auto",
    seed: int = 0,
) -> None:
    """Train the bundled llava-mini-shapes model from scratch (resumes from OUT/checkpoint.pt)."""
    from .data import shapes_training_splits
    from .train import train_mini

    model_dir = train_mini(
        out,
        *shapes_training_splits(generated_images, seed),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        device=_device(device),
        seed=seed,
        time_budget_s=time_budget_s,
    )
    typer.echo(str(model_dir))


@app.command("train-bundled")
def train_bundled_cmd(
    run: Annotated[Path, typer.Option(help="run folder; rerun with the same folder to continue")] = Path(
        "runs/bundled"
    ),
    budget_s: Annotated[float, typer.Option(help="stop (resumably) after about this many seconds")] = 540.0,
    base_steps: int = 11000,
    generated_images: int = 40000,
    qat_steps: Annotated[int, typer.Option(help="quantization-aware fine-tuning steps (0: skip)")] = 3000,
    qat_lr: float = 1e-4,
    quantizer_generated_images: Annotated[
        int, typer.Option(help="generated images added to easy-VQA train for steps 2 and 3")
    ] = 8000,
    quantizer_steps: int = 2000,
    trainable: Annotated[
        str, typer.Option(help="what learns in the quantizer sweep (comma list, as for alignedvq train)")
    ] = "quantizer",
    position_centre: bool = False,
    test_limit: int | None = None,
    sweep_limit: int | None = None,
    device: Device = "auto",
) -> None:
    """The full recipe of the bundled model: base training, then the quantizer sweep."""
    from .recipe import run_recipe

    done = run_recipe(
        run,
        budget_s=budget_s,
        device=_device(device),
        base_steps=base_steps,
        generated_images=generated_images,
        qat_steps=qat_steps,
        qat_lr=qat_lr,
        quantizer_generated_images=quantizer_generated_images,
        quantizer_steps=quantizer_steps,
        trainable=tuple(trainable.split(",")),
        position_centre=position_centre,
        test_limit=test_limit,
        sweep_limit=sweep_limit,
    )
    typer.echo("done" if done else "paused: run again to continue")


@app.command("train-scenes")
def train_scenes_cmd(
    run: Annotated[Path, typer.Option(help="run folder; rerun with the same folder to continue")] = Path(
        "runs/scenes"
    ),
    budget_s: Annotated[float, typer.Option(help="stop (resumably) after about this many seconds")] = 540.0,
    base_steps: int = 9000,
    qat_steps: int = 4000,
    qat_lr: float = 2e-4,
    train_images: Annotated[
        int | None, typer.Option(help="fewer generated train scenes (smoke runs)")
    ] = None,
    workers: Annotated[int, typer.Option(help="processes drawing the train scenes")] = 1,
    fit_budget: Annotated[bool, typer.Option(help="cut steps so both stages finish in the budget")] = False,
    base_model: Annotated[
        Path | None, typer.Option(help="continue from this model folder (skips base training)")
    ] = None,
    qat_stage: Annotated[
        str,
        typer.Option(help="QAT stage (models.recipe.SCENES_QAT): plain after base training, gated, ..."),
    ] = "plain",
    device: Device = "auto",
) -> None:
    """The llava-mini-scenes recipe: base training with the per-patch loss, then whole-model QAT."""
    from .recipe import run_scenes_recipe

    done = run_scenes_recipe(
        run,
        budget_s=budget_s,
        device=_device(device),
        base_steps=base_steps,
        qat_steps=qat_steps,
        qat_lr=qat_lr,
        train_images=train_images,
        workers=workers,
        fit_budget=fit_budget,
        base_model=base_model,
        qat_stage=qat_stage,
    )
    typer.echo("done" if done else "paused: run again to continue")


@app.command("refine")
def refine_cmd(
    model: Annotated[str, typer.Option(help="a model folder (or registry name) you may write to")],
    base: Annotated[str, typer.Option(help="the one-stage quantizer to extend, e.g. preln-4096")],
    threshold: Annotated[float, typer.Option(help="squared residual norm above which stage 2 is sent")],
    rate_lambda: Annotated[
        float, typer.Option(help="0, or squared error traded per coded bit when choosing indices")
    ] = 0.0,
    generated_images: Annotated[
        int, typer.Option(help="generated images: added to easy-VQA train, or the scenes drawn")
    ] = 8000,
    stages: Annotated[int, typer.Option(help="stages in all: the base's, then k-means ones")] = 2,
    dataset: Annotated[str, typer.Option(help="training images: easy-vqa or scenes")] = "easy-vqa",
    device: Device = "auto",
) -> None:
    """Add a variable-rate, neighbour-ranked multi-stage quantizer (recipe step 4) to a model folder."""
    from .data import VQASplit, generate_shapes, load_easy_vqa
    from .recipe import refine_quantizers
    from .scenes import load_scenes
    from .store import load_model, write_manifest

    loaded = load_model(model, device=_device(device))
    if dataset == "scenes":
        train = load_scenes("train", generated_images, workers=2)
    else:
        train = VQASplit.concat([load_easy_vqa("train"), generate_shapes(generated_images, seed=11)])
    rows = ((base, threshold, rate_lambda),)
    # Every training token is a candidate for the added stages: few need them (objects, not background).
    names = refine_quantizers(
        loaded, train.images, rows, device=_device(device), stages=stages, max_vectors=10**7
    )
    write_manifest(loaded.path)
    typer.echo(names[0])


@app.command("rank")
def rank_cmd(
    model: Annotated[str, typer.Option(help="a model folder (or registry name) you may write to")],
    quantizer: Annotated[str, typer.Option(help="a trained quantizer of that model")],
    rate_lambda: Annotated[
        float, typer.Option(help="0, or squared error traded per coded bit when choosing indices")
    ] = 0.0,
    dataset: Annotated[
        str, typer.Option(help="training images for the tables: easy-vqa or scenes")
    ] = "scenes",
    images: Annotated[int, typer.Option(help="how many training images calibrate the tables")] = 4000,
    device: Device = "auto",
) -> None:
    """Add a neighbour-ranked (optionally rate-distortion optimised) copy of a trained quantizer."""
    from .evaluate import load_dataset
    from .recipe import ranked_quantizer
    from .scenes import load_scenes
    from .store import load_model, write_manifest

    loaded = load_model(model, device=_device(device))
    if dataset == "scenes":
        train = load_scenes("train", images)
    else:
        train = load_dataset(dataset, "train", loaded.image_spec.size)
    name = ranked_quantizer(loaded, quantizer, train.images[:images], rate_lambda, device=_device(device))
    write_manifest(loaded.path)
    typer.echo(name)


@app.command("suppress")
def suppress_cmd(
    model: Annotated[str, typer.Option(help="a model folder (or registry name) you may write to")],
    quantizer: Annotated[str, typer.Option(help="a gated multi-stage quantizer of that model")],
    background_norm: Annotated[
        float, typer.Option(help="tokens of at most this squared projected norm are sent as zero")
    ],
    threshold: Annotated[float, typer.Option(help="squared residual norm above which a stage refines")],
    images: Annotated[int, typer.Option(help="training scenes that calibrate the tables")] = 4000,
    device: Device = "auto",
) -> None:
    """Add a background-suppressing copy of a quantizer: the bits go to the objects (scenes)."""
    from .recipe import suppressed_quantizer
    from .scenes import load_scenes
    from .store import load_model, write_manifest

    loaded = load_model(model, device=_device(device))
    train = load_scenes("train", images)
    name = suppressed_quantizer(
        loaded, quantizer, train.images, background_norm, threshold, device=_device(device)
    )
    write_manifest(loaded.path)
    typer.echo(name)


@app.command("retune")
def retune_cmd(
    model: Annotated[str, typer.Option(help="a model folder (or registry name) you may write to")],
    quantizer: Annotated[str, typer.Option(help="a rate-controlled quantizer of that model")],
    rate_lambda: Annotated[float, typer.Option(help="squared error traded per coded bit")],
) -> None:
    """Add a copy of a rate-controlled quantizer at another lambda, its tables kept (CPU, instant)."""
    from .recipe import retuned_quantizer
    from .store import load_model, write_manifest

    loaded = load_model(model, device="cpu")
    name = retuned_quantizer(loaded, quantizer, rate_lambda)
    write_manifest(loaded.path)
    typer.echo(name)


@app.command("train")
def train_cmd(
    model: Annotated[str, typer.Option(help="registry name or model directory")] = "llava-mini-shapes",
    site: Annotated[str, typer.Option(help="preln, embed or block:k")] = "preln",
    groups: int = 1,
    stages: int = 1,
    codebook_size: int = 4096,
    code_dim: int = 32,
    stat_bits: Annotated[int, typer.Option(help="bits per token statistic at block:k sites")] = 8,
    position_centre: Annotated[
        bool, typer.Option(help="subtract per-position means before projecting")
    ] = True,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    trainable: Annotated[
        str,
        typer.Option(
            help="comma list of quantizer (or adapter: its up map only),edge,vision,projector,language"
        ),
    ] = "quantizer",
    generated_images: int = 0,
    dataset: Annotated[
        str, typer.Option(help="easy-vqa, or a JSON file of {image, question, answers}")
    ] = "easy-vqa",
    holdout: Annotated[
        str | None, typer.Option(help="JSON file for model selection (with a JSON --dataset)")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option(help="quantizer folder; default MODEL/quantizers")] = None,
    model_out: Annotated[
        Path | None, typer.Option(help="where to save the model when cloud weights train (vision, projector)")
    ] = None,
    device: Device = "auto",
    seed: int = 0,
) -> None:
    """Fit an AlignedVQ quantizer: k-means init, then task-aware fine-tuning."""
    from .config import QuantizerConfig, SplitSite
    from .data import VQASplit, generate_shapes
    from .evaluate import load_dataset
    from .split import vision_tokens
    from .store import load_model, save_model_dir
    from .train import train_quantizers

    split_site = SplitSite.parse(site)
    loaded = load_model(model)
    vision = loaded.model.config.vision_config
    dim, tokens = vision.hidden_size, vision_tokens(vision)
    config = QuantizerConfig(
        dim=dim,
        split_site=str(split_site),
        tokens=tokens if position_centre else 0,
        groups=groups,
        stages=stages,
        codebook_size=codebook_size,
        code_dim=code_dim,
        stat_bits=stat_bits if split_site.needs_stats else 0,
    )
    parts = tuple(trainable.split(","))
    if set(parts) - {"quantizer"} and model_out is None:
        raise typer.BadParameter("training cloud weights changes the model: pass --model-out DIR")
    size = loaded.image_spec.size
    train = load_dataset(dataset, "train", size)
    if dataset == "easy-vqa":
        selection = load_dataset(dataset, "holdout", size)
    elif holdout is not None:
        selection = load_dataset(holdout, "holdout", size)
    else:
        raise typer.BadParameter("a JSON --dataset needs a --holdout JSON file for model selection")
    if generated_images:
        train = VQASplit.concat([train, generate_shapes(generated_images, seed=seed + 7)])
    folder = out_dir or loaded.path / "quantizers"
    train_quantizers(
        loaded,
        [config],
        train,
        selection,
        folder,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        trainable=parts,
        device=_device(device),
        seed=seed,
    )
    if model_out is not None:
        save_model_dir(loaded.model, loaded.tokenizer, loaded.prompt, loaded.image_spec, model_out)
    typer.echo(str(folder / f"{config.name}.safetensors"))


@app.command("eval")
def eval_cmd(
    model: str = "llava-mini-shapes",
    dataset: str = "easy-vqa",
    split: str = "test",
    quantizer: QuantizerName = "",
    limit: Annotated[int | None, typer.Option(help="first N questions only")] = None,
    batch_size: int = 256,
    device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Accuracy of the original and the split + quantized model on the same questions."""
    from .evaluate import evaluate, load_dataset

    loaded, vq = _load(model, quantizer)
    data = load_dataset(dataset, split, loaded.image_spec.size).subset(limit)
    record = evaluate(
        loaded, data, dataset, split, vq, vq.config.site, device=_device(device), batch_size=batch_size
    )
    if as_json:
        typer.echo(json.dumps(record))
    else:
        for key, value in record.items():
            typer.echo(f"{key:>24}: {value}")


@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="edge bundle file to write")],
    model: str = "llava-mini-shapes",
    quantizer: QuantizerName = "",
) -> None:
    """Write the edge bundle (what the edge client needs, numpy-loadable) for a model + quantizer."""
    from .export import write_edge_bundle

    loaded, vq = _load(model, quantizer)
    digest = write_edge_bundle(loaded, vq, out)
    typer.echo(f"{out} sha256={digest} ({out.stat().st_size} bytes)")


def main() -> None:
    """The ``alignedvq`` entry point: a mistake in the arguments (an unknown model or quantizer, a
    value out of range, a file that exists or is missing) is one line on stderr and exit code 2, as
    with ``edge-client``, instead of a traceback (typer reports usage errors itself, also with 2)."""
    try:
        app()
    except (LookupError, ValueError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
