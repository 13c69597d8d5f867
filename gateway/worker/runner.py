"""The model side of a worker: cloud half, codebook, prefix cache, batched generation (imports torch).

A :class:`Runner` holds one model cut at its quantizer's split site. ``prepare_request`` turns a request
into model inputs: the prompt's token ids (refused when the model reads none of the question's
words, or has no room for the new tokens asked for), and either the cached keys and values of the
image's prompt prefix or what computes them (the feature stream decoded and checked against the
served codebook, or a cloud-only image decoded and preprocessed). ``run`` answers a batch at once,
in two prefills (docs/conversations.md):

    features -> indices (tokens, G, S) -> quantizer.decode (codebook gather, up-projection)
    image    -> preprocess -> edge half (patch embedding, pre-LN, first blocks)
             both give hidden_states (batch, tokens, dim)
    hidden_states + prefix ids -> CloudHalf.prefix (rest of the vision tower, projector, prefill
             of BOS, template text and image tokens) -> PrefixKV, kept in the prefix cache
    PrefixKV (cached or fresh) + the rest of each prompt -> CloudHalf.generate_after

The batch generates ``max(max_new_tokens)`` tokens; each answer is cut at its own limit and at EOS.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import cast

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from transformers import PreTrainedTokenizerBase

from edge_client.bundle import EdgeBundle
from edge_client.preprocess import MAX_IMAGE_PIXELS, preprocess, upright_rgb
from edge_client.protocol import MAX_NEW_TOKENS, RequestError, VQARequest
from models.export import export_edge_bundle
from models.generation import PrefixKV
from models.prompt import PromptIds, left_pad, split_prompt, unknown_words
from models.quantizer import AlignedVQ
from models.split import split_llava
from models.store import LoadedModel, load_model

from ..errors import UnknownModel, UnreadableQuestion
from ..served_models import ModelInfo
from ..validation import StreamValidator, check_image
from .prefix_cache import PrefixCache

__all__ = ["Answer", "Prepared", "Runner", "TextStream", "resolve_device", "resolve_dtype"]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but CUDA is not available")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    resolved: torch.dtype = getattr(torch, dtype)
    return resolved


def _present(array: np.ndarray | None) -> np.ndarray:
    # Callers pick the items whose array is set; a coded item has stats whenever the quantizer has
    # stat_bits, since validation requires a stream's stat_bits to equal the served quantizer's.
    assert array is not None
    return array


@dataclass(frozen=True, eq=False)
class Prepared:
    """One request ready for compute.

    ``key``: the SHA-256 of its payload (feature stream or image bytes), the prefix cache's key.
    ``prefix``: the image's cached keys and values, when the cache had them; otherwise
    ``indices`` (tokens, G, S) uint16 and ``stats`` (tokens, 2) or None for a feature stream,
    ``pixel_values`` (3, H, W) float32 for a cloud-only image. ``unknown_words``: pieces of the
    question the tokenizer read as its unknown token (answered all the same).
    """

    prompt: PromptIds
    max_new_tokens: int
    key: bytes
    prefix: PrefixKV | None = None
    indices: np.ndarray | None = None
    stats: np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    unknown_words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Answer:
    """One answer and its token counts (OpenAI's ``usage``): the whole prompt, and the generated
    tokens up to and including EOS when the model produced one."""

    text: str
    prompt_tokens: int
    completion_tokens: int


class TextStream:
    """``on_token`` for :meth:`CloudHalf.generate_after`: after each step, each streamed row's new
    text goes to its ``publish``.

    The text so far is decoded from all of the row's tokens and compared with what was sent, so a
    word spread over several tokens comes out right; stripped like the final answer, so the
    pieces add up to it. Text ending in an incomplete character (U+FFFD) waits for the next token.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_id: int,
        limits: Sequence[int],
        publish: Mapping[int, Callable[[str], None]],
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.limits = limits
        self.publish = publish
        self.tokens: dict[int, list[int]] = {row: [] for row in publish}
        self.sent = dict.fromkeys(publish, "")
        self.done: set[int] = set()

    def __call__(self, token: torch.Tensor) -> None:
        values = token.tolist()
        for row, publish in self.publish.items():
            if row in self.done:
                continue
            if values[row] == self.eos_token_id:
                self.done.add(row)
                continue
            tokens = self.tokens[row]
            tokens.append(values[row])
            if len(tokens) >= self.limits[row]:
                self.done.add(row)
            text = cast(str, self.tokenizer.decode(tokens, skip_special_tokens=True)).strip()
            sent = self.sent[row]
            if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                publish(text[len(sent) :])
                self.sent[row] = text


class Runner:
    """One served model + quantizer; see the module docstring. ``prefix_cache_mb``: the prefix
    cache's memory (``VQA_PREFIX_CACHE_MB``, 0 = off)."""

    def __init__(
        self,
        loaded: LoadedModel,
        quantizer: AlignedVQ,
        quantizer_name: str,
        device: str,
        fused: bool = False,
        prefix_cache_mb: int = 0,
    ) -> None:
        self.loaded = loaded
        self.quantizer = quantizer.to(device).eval()
        self.device = device
        self.edge, self.cloud = split_llava(loaded.model, quantizer.config.site, fused=fused)
        self.bundle = export_edge_bundle(loaded, quantizer)
        self.prefixes: PrefixCache[PrefixKV] = PrefixCache(prefix_cache_mb * 2**20)
        self.eos_token_id = loaded.tokenizer.eos_token_id
        self.positions = int(loaded.model.config.get_text_config().max_position_embeddings)
        # Every prompt of this model starts with these ids (the template puts the image first).
        shortest = split_prompt(loaded.tokenizer, loaded.prompt, "?")
        self.prefix_ids = torch.tensor(shortest.prefix, device=device)
        # What gateways validate against is read back from the bundle edges receive, so the two
        # can never disagree.
        parsed = EdgeBundle.from_bytes(self.bundle)
        self.info = ModelInfo(
            name=loaded.name,
            quantizer=quantizer_name,
            split_site=parsed.split_site,
            tokens=parsed.tokens,
            groups=parsed.groups,
            stages=parsed.stages,
            codebook_size=parsed.codebook_size,
            code_dim=parsed.code_dim,
            stat_bits=parsed.stat_bits,
            codebook_hash=parsed.codebook_hash,
            bundle_sha256=parsed.sha256,
            bundle_bytes=parsed.nbytes,
            image_size=parsed.image_spec.size,
            max_new_tokens=min(MAX_NEW_TOKENS, self.positions - len(shortest)),
        )
        self.streams = StreamValidator(self.info, self.info.codebook_hash, parsed.freqs, parsed.ranking)

    @classmethod
    def load(
        cls,
        model: str,
        quantizer: str,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
        fused: str = "auto",
        prefix_cache_mb: int = 0,
    ) -> Runner:
        """Load ``model`` (registry name or directory) and its quantizer ``quantizer`` (file stem;
        empty: the one the model folder names as its default).

        ``fused``: ``auto`` decodes with :mod:`models.fused` on CUDA devices, ``on``/``off`` force it.
        """
        if threads:
            torch.set_num_threads(threads)
        # numpy's BLAS only serves stream decoding here (small neighbour-rank GEMMs, one request at
        # a time); its threads would fight torch's for the same cores (3-10x slower decodes).
        threadpool_limits(limits=1, user_api="blas")
        device = resolve_device(device)
        loaded = load_model(model, device=device, dtype=resolve_dtype(dtype, device))
        quantizer = quantizer or loaded.default_quantizer
        vq = AlignedVQ.load(loaded.quantizer_path(quantizer), map_location=device)
        use_fused = fused == "on" or (fused == "auto" and device.startswith("cuda"))
        return cls(loaded, vq, quantizer, device, fused=use_fused, prefix_cache_mb=prefix_cache_mb)

    def prompt(self, question: str, history: Sequence[str], max_new_tokens: int) -> PromptIds:
        """The prompt's ids; RequestError when the model has no room for ``max_new_tokens`` after them."""
        ids = split_prompt(self.loaded.tokenizer, self.loaded.prompt, question, history)
        room = self.positions - len(ids)
        if room < max_new_tokens:
            raise RequestError(
                f"field 'max_new_tokens': {self.info.name} reads {self.positions} positions and this "
                f"prompt takes {len(ids)} of them, so at most {max(room, 0)} new tokens fit; "
                f"got {max_new_tokens}"
            )
        return ids

    def prepare_request(self, request: VQARequest, scope: str) -> Prepared:
        """Decode one request into model inputs, with the checks of :mod:`gateway.validation` (which
        say why the worker repeats none of them needlessly); raises the same 4xx as the gateway.

        A payload whose prefix is cached is not decoded again: the same bytes passed every check
        when they were first decoded, against the same codebook. Cache entries are the tenant's
        (``scope``, :class:`gateway.queue.Job`): a hit is faster, and its ``compute_ms`` would
        tell another tenant that someone had asked about the same image.
        """
        if request.model != self.info.name:
            raise UnknownModel(f"this worker serves {self.info.name!r}, got a request for {request.model!r}")
        unknown, unreadable = unknown_words(self.loaded.tokenizer, request.question)
        if unreadable:
            raise UnreadableQuestion(
                f"{self.info.name} knows no word of the question: {', '.join(map(repr, unknown)) or 'none'}"
            )
        prompt = self.prompt(request.question, request.history, request.max_new_tokens)
        payload = request.features if request.features is not None else request.image
        if payload is None:
            raise RequestError(
                "the queued request carries no 'features' or 'image' "
                "(an 'image_ref' is the gateway's to resolve)"
            )
        key = hashlib.sha256(scope.encode() + b"\0" + payload).digest()
        item = Prepared(prompt, request.max_new_tokens, key, unknown_words=tuple(unknown))
        cached = self.prefixes.get(key)
        if cached is not None:
            return replace(item, prefix=cached)
        if request.features is not None:
            decoded = self.streams.decode(request.model, request.features)
            return replace(item, indices=decoded.indices, stats=decoded.stats)
        image = upright_rgb(check_image(payload, MAX_IMAGE_PIXELS))
        return replace(item, pixel_values=preprocess(image, self.loaded.image_spec))

    @torch.inference_mode()
    def hidden_states(self, items: list[Prepared]) -> torch.Tensor:
        """``(batch, tokens, dim)`` at the split site, in batch order."""
        rows: dict[int, torch.Tensor] = {}
        coded = [i for i, item in enumerate(items) if item.indices is not None]
        if coded:
            indices = torch.from_numpy(np.stack([_present(items[i].indices) for i in coded]).astype(np.int64))
            levels = None
            if self.quantizer.config.stat_bits:
                levels = torch.from_numpy(
                    np.stack([_present(items[i].stats) for i in coded]).astype(np.int64)
                )
                levels = levels.to(self.device)
            decoded = self.quantizer.decode(indices.to(self.device), levels)
            rows.update(zip(coded, decoded, strict=True))
        images = [i for i, item in enumerate(items) if item.pixel_values is not None]
        if images:
            pixels = torch.from_numpy(np.stack([_present(items[i].pixel_values) for i in images])).to(
                self.device
            )
            rows.update(zip(images, self.edge(pixels), strict=True))
        dtype = next(self.cloud.parameters()).dtype
        return torch.stack([rows[i].to(dtype) for i in range(len(items))])

    @torch.inference_mode()
    def prefixes_of(self, items: list[Prepared]) -> PrefixKV:
        """The batch's prefix keys and values: cached rows as they are, the others computed (once
        per distinct payload) and cached."""
        missing: dict[bytes, int] = {}
        for i, item in enumerate(items):
            if item.prefix is None:
                missing.setdefault(item.key, i)
        if not missing:
            return PrefixKV.stack([cast(PrefixKV, item.prefix) for item in items])
        computed = self.cloud.prefix(
            self.hidden_states([items[i] for i in missing.values()]), self.prefix_ids
        )
        every_row_fresh = len(missing) == len(items)
        rows = computed.rows() if self.prefixes.budget or not every_row_fresh else []
        for key, row in zip(missing, rows, strict=False):  # no rows when nothing is cached
            self.prefixes.put(key, row)
        if every_row_fresh:
            return computed
        fresh = dict(zip(missing, rows, strict=True))
        return PrefixKV.stack([fresh[item.key] if item.prefix is None else item.prefix for item in items])

    def warmup(self, batch: int) -> float:
        """Answer one synthetic full batch (valid random codes); returns its wall time in ms. The
        synthetic images leave nothing in the prefix cache."""
        rng = np.random.default_rng(0)
        c = self.quantizer.config
        shape = (self.info.tokens, c.groups, c.stages)
        prompt = self.prompt("what color is the shape?", (), 2)
        items = [
            Prepared(
                prompt,
                2,
                i.to_bytes(8, "big"),
                indices=rng.integers(0, c.codebook_size, size=shape, dtype=np.uint16),
                stats=rng.integers(0, 2**c.stat_bits, size=(self.info.tokens, 2), dtype=np.uint16)
                if c.stat_bits
                else None,
            )
            for i in range(batch)
        ]
        started = time.perf_counter()
        self.run(items)
        self.prefixes.clear()
        return (time.perf_counter() - started) * 1000

    @torch.inference_mode()
    def run(
        self, items: list[Prepared], streams: Mapping[int, Callable[[str], None]] | None = None
    ) -> list[Answer]:
        """Answers for a batch, one generation. ``streams``: row -> where that row's new text goes
        after each step."""
        prefix = self.prefixes_of(items)
        input_ids, attention_mask = left_pad(
            [list(item.prompt.rest) for item in items], self.loaded.tokenizer.pad_token_id
        )
        limits = [item.max_new_tokens for item in items]
        on_token = TextStream(self.loaded.tokenizer, self.eos_token_id, limits, streams) if streams else None
        new_tokens = self.cloud.generate_after(
            prefix,
            input_ids.to(self.device),
            attention_mask.to(self.device),
            max_new_tokens=max(limits),
            on_token=on_token,
        )
        answers = []
        for row, item in zip(new_tokens.tolist(), items, strict=True):
            row = row[: item.max_new_tokens]
            completion = row.index(self.eos_token_id) + 1 if self.eos_token_id in row else len(row)
            text = self.loaded.tokenizer.decode(row[:completion], skip_special_tokens=True)
            # One sequence of ids decodes to one string (transformers types decode for batches too).
            answers.append(Answer(cast(str, text).strip(), len(item.prompt), completion))
        return answers
