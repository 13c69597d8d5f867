"""Accuracy of a model before and after the split + AlignedVQ round trip, on the same questions.

    alignedvq eval --model llava-mini-shapes --dataset easy-vqa --split test --json

Each image is encoded once at the edge, quantized, and its bitstream measured (plain packed and
entropy-coded, header included) and wrapped in a real msgpack request to report the body size.
Metrics: exact match for single-answer questions; VQA soft accuracy ``min(matches / 3, 1)`` where a
question has several reference answers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from edge_client.bitstream import StreamHeader, encode_stream
from edge_client.entropy import normalize_freqs
from edge_client.preprocess import resize_and_crop
from edge_client.protocol import VQARequest, encode_request

from .config import SplitSite
from .data import VQASplit, load_easy_vqa, load_json_vqa
from .prompt import encode_prompts
from .quantizer import AlignedVQ
from .split import CloudHalf, EdgeHalf, split_llava
from .store import LoadedModel
from .tensor_split import pixel_values


def normalize_answer(text: str) -> str:
    """Lower-case words; punctuation dropped. One-word answers are compared by their first word
    (a short answer may run on), sentences (``describe``) word for word."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _matches(prediction: str, reference: str) -> bool:
    ref = normalize_answer(reference)
    return prediction == ref if " " in ref else prediction.split(" ", 1)[0] == ref


def vqa_score(prediction: str, references: list[str]) -> float:
    """Exact match for one reference; VQA soft accuracy for several."""
    hits = sum(_matches(prediction, r) for r in references)
    return float(hits > 0) if len(references) == 1 else min(hits / 3.0, 1.0)


def load_dataset(name: str, split: str, image_size: int) -> VQASplit:
    """``easy-vqa`` or ``scenes`` (split train/holdout/test), or a JSON file of records
    (see ``load_json_vqa``)."""
    if name == "easy-vqa":
        return load_easy_vqa(split)
    if name == "scenes":
        from .scenes import load_scenes

        return load_scenes(split)
    if name.endswith(".json"):
        return load_json_vqa(name, image_size)
    raise ValueError(f"unknown dataset {name!r}; expected easy-vqa, scenes or a .json file")


def stream_header(
    loaded_name: str, quantizer: AlignedVQ, site: SplitSite, tokens: int, digest: str
) -> StreamHeader:
    c = quantizer.config
    return StreamHeader(
        model=loaded_name,
        codebook_hash=digest,
        split_site=str(site),
        tokens=tokens,
        groups=c.groups,
        stages=c.stages,
        codebook_size=c.codebook_size,
        coder="packed",
        stat_bits=c.stat_bits,
    )


@dataclass
class EncodedImages:
    hidden_states: torch.Tensor  # (images, tokens, dim) what the cloud half receives
    stream_bytes: list[int]  # per image, plain packed
    entropy_bytes: list[int]  # per image, rANS where smaller
    streams: list[bytes]  # the entropy-coded streams, for request-size measurement


@torch.no_grad()
def encode_images(
    loaded: LoadedModel,
    edge: EdgeHalf,
    images: np.ndarray,
    site: SplitSite,
    quantizer: AlignedVQ | None,
    device: str,
    batch_size: int = 256,
) -> EncodedImages:
    """Edge half (+ quantizer round trip and bitstreams) for ``images`` ``(n, H, W, 3)`` uint8."""
    outs, packed, coded, streams = [], [], [], []
    digest = quantizer.content_hash() if quantizer is not None else ""
    freqs = (
        normalize_freqs(quantizer.freqs.cpu().numpy())
        if quantizer is not None and quantizer.freqs.sum()
        else None
    )
    ranking = quantizer.ranking() if freqs is not None and quantizer.config.rank_tokens else None
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).to(device)
        hidden = edge(pixel_values(chunk, loaded.image_spec)).float()
        if quantizer is not None:
            indices, levels = quantizer.encode(hidden)
            hidden = quantizer.decode(indices, levels)
            header = stream_header(loaded.name, quantizer, site, indices.shape[1], digest)
            idx_np = indices.cpu().numpy()
            lv_np = None if levels is None else levels.cpu().numpy()
            for i in range(idx_np.shape[0]):
                stats = None if lv_np is None else lv_np[i]
                packed.append(len(encode_stream(header, idx_np[i], stats, entropy=False)))
                stream = encode_stream(
                    header, idx_np[i], stats, freqs=freqs, ranking=ranking, entropy=freqs is not None
                )
                coded.append(len(stream))
                streams.append(stream)
        outs.append(hidden)
    return EncodedImages(torch.cat(outs), packed, coded, streams)


@torch.no_grad()
def answer(
    loaded: LoadedModel,
    cloud: CloudHalf,
    hidden_states: torch.Tensor,
    split: VQASplit,
    device: str,
    batch_size: int = 256,
) -> list[str]:
    """Greedy answers for every question, its image's hidden states gathered from ``hidden_states``.

    Each batch decodes as many tokens as its longest reference answer needs (3 for one word)."""
    preds: list[str] = []
    for start in range(0, len(split), batch_size):
        longest = max(len(a.split()) for refs in split.answers[start : start + batch_size] for a in refs)
        max_new_tokens = max(3, longest + 2)
        questions = split.questions[start : start + batch_size]
        rows = torch.from_numpy(split.image_index[start : start + batch_size]).to(device)
        ids, mask = encode_prompts(loaded.tokenizer, loaded.prompt, questions)
        new = cloud.generate(
            hidden_states[rows], ids.to(device), mask.to(device), max_new_tokens=max_new_tokens
        )
        preds += [normalize_answer(t) for t in loaded.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return preds


def accuracy(preds: list[str], split: VQASplit) -> float:
    return float(np.mean([vqa_score(p, refs) for p, refs in zip(preds, split.answers, strict=True)]))


def accuracy_by_family(preds: list[str], split: VQASplit) -> dict[str, float]:
    """Accuracy per question family (generated sets only)."""
    scores: dict[str, list[float]] = {}
    for p, refs, family in zip(preds, split.answers, split.families or [], strict=True):
        scores.setdefault(family, []).append(vqa_score(p, refs))
    return {family: float(np.mean(s)) for family, s in sorted(scores.items())}


def _score(record: dict, key: str, preds: list[str], split: VQASplit) -> None:
    record[f"accuracy_{key}"] = accuracy(preds, split)
    if split.families is not None:
        record[f"accuracy_by_family_{key}"] = accuracy_by_family(preds, split)


def evaluate(
    loaded: LoadedModel,
    split: VQASplit,
    dataset: str,
    split_name: str,
    quantizer: AlignedVQ | None,
    site: SplitSite,
    device: str = "cpu",
    batch_size: int = 256,
    with_original: bool = True,
) -> dict:
    """One JSON-able record: accuracy of the original and the AlignedVQ model, bits and bytes."""
    model = loaded.model.to(device).eval()
    edge, cloud = split_llava(model, site)
    used = np.unique(split.image_index)
    remap = np.zeros(split.images.shape[0], dtype=np.int64)
    remap[used] = np.arange(len(used))
    images = split.images[used]
    if images.shape[1:3] != (loaded.image_spec.size,) * 2:  # e.g. 64 px easy-VQA for a 336 px model
        images = np.stack([resize_and_crop(Image.fromarray(im), loaded.image_spec.size) for im in images])
    compact = VQASplit(images, split.questions, split.answers, remap[split.image_index], split.families)
    record: dict = {
        "model": loaded.name,
        "dataset": dataset,
        "split": split_name,
        "n": len(split),
        "images": len(used),
    }
    if with_original:
        plain = encode_images(loaded, edge, compact.images, site, None, device)
        preds = answer(loaded, cloud, plain.hidden_states, compact, device, batch_size)
        _score(record, "original", preds, compact)
    if quantizer is not None:
        enc = encode_images(loaded, edge, compact.images, site, quantizer.to(device).eval(), device)
        preds = answer(loaded, cloud, enc.hidden_states, compact, device, batch_size)
        _score(record, "alignedvq", preds, compact)
        tokens = enc.hidden_states.shape[1]
        body = [
            len(
                encode_request(
                    VQARequest(
                        request_id=f"eval-{i:08d}",
                        model=loaded.name,
                        question=compact.questions[i],
                        features=enc.streams[int(compact.image_index[i])],
                    )
                )
            )
            for i in range(min(len(compact), 2000))
        ]
        c = quantizer.config
        header_bytes = stream_header(loaded.name, quantizer, site, tokens, "0" * 16).nbytes
        record.update(
            site=str(site),
            groups=c.groups,
            stages=c.stages,
            codebook_size=c.codebook_size,
            code_dim=c.code_dim,
            stat_bits=c.stat_bits,
            refine_threshold=c.refine_threshold,
            rate_lambda=c.rate_lambda,
            background_norm=c.background_norm,
            ranked=bool(c.rank_tokens),
            tokens=tokens,
            bits_per_token=c.bits_per_token,
            stream_bytes_packed=float(np.mean(enc.stream_bytes)),
            stream_bytes_entropy=float(np.mean(enc.entropy_bytes)),
            header_bytes=header_bytes,
            # Index (+ stats) section only; the fixed header is reported beside it.
            bits_per_token_entropy=(float(np.mean(enc.entropy_bytes)) - header_bytes) * 8 / tokens,
            payload_bytes=float(np.mean(body)),
            codebook_hash=quantizer.content_hash(),
        )
    return record
