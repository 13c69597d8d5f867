"""Prompt rendering with history, the split at the image, and the words a tokenizer cannot read."""

from __future__ import annotations

import json

import pytest

from models.mini import SHAPES
from models.prompt import IMAGE_PLACEHOLDER, PromptFormat, encode_prompts, split_prompt, unknown_words
from models.scenes import TURN_SEPARATOR
from models.store import BUNDLED, LLAVA15_PROMPT

MINI = SHAPES.prompt


def test_a_single_turn_renders_the_template() -> None:
    assert LLAVA15_PROMPT.render("q?") == "USER: " + IMAGE_PLACEHOLDER * 576 + "\nq? ASSISTANT:"
    assert MINI.render("q ?") == IMAGE_PLACEHOLDER * 64 + " q ? answer :"


def test_llava15_history_follows_its_chat_template() -> None:
    text = LLAVA15_PROMPT.render("q3", ["q1", "a1", "q2", "a2"]).replace(IMAGE_PLACEHOLDER * 576, "<image>")
    assert text == "USER: <image>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>USER: q3 ASSISTANT:"


def test_mini_history_is_how_the_scenes_model_was_trained() -> None:
    trained = "<image> " + "q1" + TURN_SEPARATOR.format(answer="a1") + "q2" + " answer :"  # models.scenes
    assert MINI.render("q2", ["q1", "a1"]).replace(IMAGE_PLACEHOLDER * 64, "<image>") == trained


def test_history_must_pair_questions_with_answers() -> None:
    with pytest.raises(ValueError, match="alternates questions and answers, got 1"):
        MINI.render("q", ["q0"])


@pytest.mark.parametrize(
    "fmt", [LLAVA15_PROMPT, MINI, PromptFormat("<image>{question}", 4, " {answer}", "Q: {question}")]
)
def test_formats_round_trip_through_their_json(fmt: PromptFormat) -> None:
    assert PromptFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt


def test_bundled_model_folders_load_with_the_defaults() -> None:
    meta = json.loads((BUNDLED / "llava-mini-shapes" / "alignedvq.json").read_text())
    assert set(meta) == {"prompt", "image_tokens", "image_spec"}
    assert PromptFormat.from_dict(meta) == MINI


def test_every_prompt_of_a_model_shares_its_prefix_and_the_ids_are_the_whole_prompts() -> None:
    tokenizer = SHAPES.build_tokenizer()
    first = split_prompt(tokenizer, MINI, "what color is the shape?")
    later = split_prompt(tokenizer, MINI, "is it red?", ["what shape is present?", "circle"])
    image = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    assert first.prefix == later.prefix == (tokenizer.bos_token_id, *[image] * 64)
    ids, _ = encode_prompts(tokenizer, MINI, ["what color is the shape?"])
    assert first.prefix + first.rest == tuple(ids[0].tolist()) and len(first) == ids.shape[1]
    assert tokenizer.convert_ids_to_tokens(later.rest[:6]) == [
        "what",
        "shape",
        "is",
        "present",
        "?",
        "answer",
    ]
    assert tokenizer.convert_ids_to_tokens(later.rest[6:9]) == [":", "circle", "</s>"]


def test_unknown_words_are_the_pieces_read_as_unk() -> None:
    tokenizer = SHAPES.build_tokenizer()
    assert unknown_words(tokenizer, "WHAT Color is the shape?") == ([], False)  # normalised, then known
    assert unknown_words(tokenizer, "what is the Xyzzy shape? xyzzy Xyzzy") == (["Xyzzy", "xyzzy"], False)
    assert unknown_words(tokenizer, "xyzzy plugh") == (["xyzzy", "plugh"], True)
