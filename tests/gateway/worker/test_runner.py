"""The worker's compute: two prefills with a prefix cache that never changes an answer, the
decoding path chosen by ``VQA_FUSED``, token counts, streamed text, and the requests it refuses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder
from edge_client.protocol import RequestError, VQARequest
from gateway.errors import UnreadableQuestion
from gateway.worker.runner import Prepared, Runner, TextStream
from models.data import generate_shapes
from models.fused import FusedLlama
from models.generation import HFEngine
from models.quantizer import AlignedVQ
from models.store import DEFAULT_QUANTIZER, load_model
from tests.conftest import TINY_QUANTIZER

TENANT = "key:0123456789abcdef"


def _requests(runner: Runner, images: list[np.ndarray], asks: list[tuple], **fields) -> list[VQARequest]:
    """``asks``: (image index, question[, history]); each image encoded once, as an edge client does."""
    encoder = EdgeEncoder(EdgeBundle.from_bytes(runner.bundle))
    streams = [encoder.encode_image(image) for image in images]
    return [
        VQARequest(
            request_id=f"r{i}",
            model=runner.info.name,
            question=ask[1],
            features=streams[ask[0]],
            history=list(ask[2]) if len(ask) > 2 else [],
            **fields,
        )
        for i, ask in enumerate(asks)
    ]


def _pair(model: str, quantizer: str) -> tuple[Runner, Runner]:
    """Two runners over one loaded model: with a prefix cache and without one."""
    loaded = load_model(model)
    vq = AlignedVQ.load(loaded.quantizer_path(quantizer))
    return Runner(loaded, vq, quantizer, "cpu", prefix_cache_mb=64), Runner(loaded, vq, quantizer, "cpu")


@pytest.fixture(scope="module")
def shapes() -> tuple[Runner, Runner]:
    return _pair("llava-mini-shapes", DEFAULT_QUANTIZER)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Runner, Runner]:
    return _pair(str(tiny_model_dir), TINY_QUANTIZER)


def _answers_with_and_without_cache(cached: Runner, plain: Runner):
    """A first batch fills the cache; the second mixes cached and uncached images (one asked twice,
    two with history), and is answered by both runners. Returns both answer lists and the
    reference answers."""
    split = generate_shapes(3, seed=7, questions_per_image=3, size=cached.info.image_size)
    images, asked = list(split.images), list(zip(split.image_index.tolist(), split.questions, strict=True))
    first = cached.run(
        [cached.prepare_request(r, TENANT) for r in _requests(cached, images, [asked[0], asked[3]])]
    )
    earlier = [asked[3][1], first[1].text]  # the conversation so far about image 1
    rows = [1, 6, 4, 8]  # images 0 (cached), 2, 1 (cached, with history), 2 (with history)
    asks = [asked[1], asked[6], (*asked[4], earlier), (*asked[8], [asked[7][1], "yes"])]
    second = _requests(cached, images, asks)
    items = [cached.prepare_request(r, TENANT) for r in second]
    assert [item.prefix is not None for item in items] == [True, False, True, False]
    assert len(items[2].prompt) > len(cached.prompt(asked[4][1], (), 1))  # the history is in the prompt
    references = [split.answers[i][0] for i in rows]
    return cached.run(items), plain.run([plain.prepare_request(r, TENANT) for r in second]), references


@pytest.mark.parametrize("model", ["shapes", "tiny"])
def test_answers_are_identical_with_and_without_the_prefix_cache(model: str, request) -> None:
    cached, plain = request.getfixturevalue(model)
    with_cache, without, references = _answers_with_and_without_cache(cached, plain)
    assert with_cache == without
    assert len(cached.prefixes) == 3 and not len(plain.prefixes)
    if model == "shapes":  # the real model answers right: the answers compared are not noise
        assert [a.text for a in with_cache] == references


def test_a_tenant_never_gets_another_tenants_cached_prefix(shapes: tuple[Runner, Runner]) -> None:
    """A hit is faster (and shows in ``compute_ms``): a shared entry would tell one tenant that
    another had asked about the same image."""
    cached = shapes[0]
    split = generate_shapes(1, seed=11, questions_per_image=1, size=cached.info.image_size)
    (request,) = _requests(cached, list(split.images), [(0, split.questions[0])])
    cached.run([cached.prepare_request(request, TENANT)])
    assert cached.prepare_request(request, TENANT).prefix is not None
    other = cached.prepare_request(request, "key:fedcba9876543210")
    assert other.prefix is None and other.indices is not None  # decoded and computed afresh
    cached.run([other])
    assert cached.prepare_request(request, "key:fedcba9876543210").prefix is not None


def test_a_queued_request_without_its_payload_is_refused(shapes: tuple[Runner, Runner]) -> None:
    request = VQARequest(
        request_id="r", model="llava-mini-shapes", question="what shape?", image_ref=bytes(16)
    )
    with pytest.raises(RequestError, match="an 'image_ref' is the gateway's to resolve"):
        shapes[1].prepare_request(request, TENANT)


def test_fused_decoding_is_chosen_by_setting_and_answers_the_same(tiny_model_dir: Path, runner) -> None:
    fused = Runner.load(str(tiny_model_dir), TINY_QUANTIZER, device="cpu", dtype="float32", fused="on")
    assert isinstance(fused.cloud.engine, FusedLlama) and isinstance(
        runner.cloud.engine, HFEngine
    )  # auto: off on CPU
    rng = np.random.default_rng(3)
    size = fused.quantizer.config.codebook_size
    items = [
        Prepared(
            fused.prompt(question, (), 4),
            4,
            bytes([i]),
            indices=rng.integers(0, size, (fused.info.tokens, 1, 1), dtype=np.uint16),
        )
        for i, question in enumerate(
            ("what color is the shape?", "is there a circle?", "what shape is present?")
        )
    ]
    assert fused.run(items) == runner.run(items)


def test_token_counts(shapes: tuple[Runner, Runner]) -> None:
    runner = shapes[1]
    images = list(generate_shapes(1, seed=3, size=runner.info.image_size).images)
    request = _requests(runner, images, [(0, "what shape is in the image?")], max_new_tokens=5)[0]
    item = runner.prepare_request(request, TENANT)
    answer = runner.run([item])[0]
    words = len(answer.text.split())  # a word-level tokenizer: one token per word, then EOS
    assert answer.prompt_tokens == len(item.prompt) == 1 + 64 + 7 + 2  # BOS, image, 6 words + "?", "answer :"
    assert answer.completion_tokens == words + 1 <= 5


def test_questions_with_unknown_words_are_answered_and_report_them(shapes: tuple[Runner, Runner]) -> None:
    runner = shapes[1]
    images = list(generate_shapes(1, seed=3, size=runner.info.image_size).images)
    some, none = _requests(runner, images, [(0, "what Xyzzy shape is in the image?"), (0, "xyzzy plugh ?!")])
    assert runner.prepare_request(some, TENANT).unknown_words == ("Xyzzy",)
    with pytest.raises(UnreadableQuestion, match=re.escape("'xyzzy', 'plugh', '?!'")):
        runner.prepare_request(none, TENANT)


def test_new_tokens_are_limited_by_the_positions_left_after_the_prompt(shapes: tuple[Runner, Runner]) -> None:
    runner = shapes[1]
    shortest = runner.prompt("?", (), 1)
    assert runner.info.max_new_tokens == runner.positions - len(shortest) == 128 - 68
    images = list(generate_shapes(1, seed=3, size=runner.info.image_size).images)
    question = "what shape is in the image?"
    room = runner.positions - len(runner.prompt(question, (), 1))
    fits, over = _requests(runner, images, [(0, question)] * 2)
    assert (
        runner.prepare_request(fits.model_copy(update={"max_new_tokens": room}), TENANT).max_new_tokens
        == room
    )
    with pytest.raises(RequestError, match=f"at most {room} new tokens fit; got {room + 1}"):
        runner.prepare_request(over.model_copy(update={"max_new_tokens": room + 1}), TENANT)


def test_streamed_text_adds_up_to_the_answer(shapes: tuple[Runner, Runner]) -> None:
    runner = shapes[1]
    images = list(generate_shapes(2, seed=5, size=runner.info.image_size).images)
    requests = _requests(
        runner, images, [(0, "what shape is in the image?"), (1, "what color is it?"), (1, "is it blue?")]
    )
    items = [runner.prepare_request(r, TENANT) for r in requests]
    pieces: dict[int, list[str]] = {0: [], 2: []}
    answers = runner.run(items, {row: pieces[row].append for row in pieces})
    assert answers == runner.run(items)  # streaming changes nothing
    for row, streamed in pieces.items():
        assert streamed and "".join(streamed) == answers[row].text
        assert len(streamed) == len(answers[row].text.split())  # one piece per word


def test_a_word_of_several_tokens_streams_whole_pieces() -> None:
    vocab = {"[UNK]": 0, "</s>": 1, "the": 2, "ele": 3, "##phant": 4, "##s": 5}
    core = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    pieces: list[str] = []
    stream = TextStream(tokenizer, eos_token_id=1, limits=[8, 8], publish={1: pieces.append})
    for step in ([2, 2], [3, 3], [4, 4], [5, 5], [1, 1], [2, 2]):
        stream(torch.tensor(step))
    assert pieces == ["the", " ele", "phant", "s"]  # nothing after EOS; the other row is not streamed
