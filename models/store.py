"""The models we can serve, and the on-disk model directory format with its sha256 manifest.

- ``llava-mini-shapes``: bundled in this repository (``models/bundled/llava-mini-shapes``).
- ``llava-1.5-7b``: ``llava-hf/llava-1.5-7b-hf`` from the local Hugging Face cache; never downloaded
  at run time (a clear :class:`ModelNotAvailable` when it is absent).

A model directory holds ``config.json``, ``model.safetensors``, the tokenizer files,
``alignedvq.json`` (prompt format + image spec), ``quantizers/*.safetensors`` and ``manifest.json``
(sha256 of every other file, checked on load).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration, PreTrainedTokenizerBase

from edge_client.preprocess import ImageSpec

from .prompt import PromptFormat

BUNDLED = Path(__file__).parent / "bundled"
DEFAULT_MODEL = "llava-mini-shapes"
DEFAULT_QUANTIZER = "preln-r2x4096-t12-ranked"
LLAVA15_REPO = "llava-hf/llava-1.5-7b-hf"
# The llava-hf chat template: each earlier answer is closed by </s>, later turns start with USER:.
LLAVA15_PROMPT = PromptFormat(
    template="USER: <image>\n{question} ASSISTANT:", image_tokens=576, answer=" {answer}</s>"
)


class ModelNotAvailable(LookupError):
    """The named model is unknown, or its weights are not on this machine."""


@dataclass
class LoadedModel:
    name: str
    model: LlavaForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase
    prompt: PromptFormat
    image_spec: ImageSpec
    path: Path
    # The quantizer served when none is named: a model folder's alignedvq.json may say which.
    default_quantizer: str = DEFAULT_QUANTIZER

    def quantizer_path(self, name: str = "") -> Path:
        """The file of quantizer ``name`` (empty: the model's default)."""
        name = name or self.default_quantizer
        path = self.path / "quantizers" / f"{name}.safetensors"
        if not path.is_file():
            available = sorted(p.stem for p in (self.path / "quantizers").glob("*.safetensors"))
            raise ModelNotAvailable(f"model {self.name} has no quantizer {name!r}; available: {available}")
        return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> dict[str, str]:
    files = {
        str(p.relative_to(directory)): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        # Logs and training checkpoints travel beside a model but are not part of it.
        if p.is_file() and p.name != "manifest.json" and p.suffix not in (".jsonl", ".pt")
    }
    (directory / "manifest.json").write_text(json.dumps(files, indent=1, sort_keys=True) + "\n")
    return files


def verify_manifest(directory: Path) -> None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        raise ModelNotAvailable(f"{directory} has no manifest.json")
    for name, digest in json.loads(manifest.read_text()).items():
        path = directory / name
        if not path.is_file():
            raise ModelNotAvailable(f"{directory}: {name} is listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise ModelNotAvailable(f"{directory}: {name} does not match its sha256 in manifest.json")


def save_model_dir(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerBase,
    prompt: PromptFormat,
    image_spec: ImageSpec,
    directory: Path,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Weights in ``dtype`` (fp16 keeps the bundled model small), tokenizer, format file, manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    meta = {**prompt.to_dict(), "image_spec": image_spec.to_dict()}
    (directory / "alignedvq.json").write_text(json.dumps(meta, indent=1) + "\n")
    write_manifest(directory)


def load_model_dir(
    directory: Path, name: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a model directory written by :func:`save_model_dir`, verifying its manifest."""
    verify_manifest(directory)
    meta = json.loads((directory / "alignedvq.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return LoadedModel(
        name=name or directory.name,
        model=model,
        tokenizer=tokenizer,
        prompt=PromptFormat.from_dict(meta),
        image_spec=ImageSpec.from_dict(meta["image_spec"]),
        path=directory,
        default_quantizer=meta.get("default_quantizer", DEFAULT_QUANTIZER),
    )


def _llava15_dir() -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(LLAVA15_REPO, local_files_only=True))
    except Exception as exc:  # huggingface_hub raises several types for "not cached"
        raise ModelNotAvailable(
            f"llava-1.5-7b needs {LLAVA15_REPO} in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); it is never downloaded at run time"
        ) from exc


def _load_llava15(device: str, dtype: torch.dtype) -> LoadedModel:
    directory = _llava15_dir()
    processor = json.loads((directory / "preprocessor_config.json").read_text())
    crop = processor.get("crop_size", {})
    size = crop.get("height", crop) if isinstance(crop, dict) else crop
    model = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(device).eval()
    return LoadedModel(
        name="llava-1.5-7b",
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(directory),
        prompt=LLAVA15_PROMPT,
        image_spec=ImageSpec(
            size=int(size), mean=tuple(processor["image_mean"]), std=tuple(processor["image_std"])
        ),
        path=directory,
    )


def available_models() -> list[str]:
    return (
        sorted(p.name for p in BUNDLED.iterdir() if (p / "manifest.json").is_file()) + ["llava-1.5-7b"]
        if BUNDLED.is_dir()
        else ["llava-1.5-7b"]
    )


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Resolve a registry name (or a model directory path) and load it."""
    if name == "llava-1.5-7b":
        return _load_llava15(device, dtype)
    path = BUNDLED / name
    if not path.is_dir() and Path(name).is_dir():
        path = Path(name)
    if not (path / "manifest.json").is_file():
        raise ModelNotAvailable(f"unknown model {name!r}; available: {available_models()}")
    return load_model_dir(path, name=path.name, device=device, dtype=dtype)
