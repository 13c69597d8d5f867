"""OpenAI's chat completions API in our terms: request models, the conversion to a VQARequest, and
the completion, chunk and error bodies (docs/conversations.md, "POST /v1/chat/completions").

What maps to what:

- content parts: ``text``; ``image_url`` with a ``data:`` URL (the cloud-only path: the gateway
  fetches nothing, so no other URL is accepted); our ``alignedvq`` part
  (:mod:`edge_client.chat`) with ``features`` or an ``image_ref``. One image per conversation.
- the last message is the user's question; earlier user and assistant messages, alternating,
  become ``history``. ``system`` and ``developer`` messages are accepted and left out: the
  models' templates have no system turn.
- ``max_tokens`` or ``max_completion_tokens`` -> ``max_new_tokens`` (default 8, as on
  ``/v1/vqa``); ``usage`` counts the worker's prompt and completion tokens; ``finish_reason`` is
  ``length`` when the answer used every token it was allowed.
- parameters we do not use (``temperature``, ``top_p``, ``seed`` ...) are ignored: decoding is
  greedy; ``n`` above 1 is refused.

Errors are OpenAI error objects, ``{"error": {"message", "type", "param", "code"}}``, with our
error code as ``code`` and the HTTP status ``/v1/vqa`` would give.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_client.chat import CHAT_PART_TYPE, read_chat_part
from edge_client.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    MAX_HISTORY_TURNS,
    MAX_NEW_TOKENS,
    RequestError,
    VQARequest,
    VQAResponse,
    parse_request,
)

__all__ = [
    "CHAT_PATH",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatRequest",
    "OpenAIErrorBody",
    "chunk",
    "completion",
    "error_object",
    "finish_reason",
    "to_request",
]

CHAT_PATH = "/v1/chat/completions"
# System messages and the question come on top of the history's turns.
_MAX_MESSAGES = 2 * MAX_HISTORY_TURNS + 9
_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_IMAGE_MEDIA = ("image/png", "image/jpeg", "image/webp")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImageURLPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class AlignedVQContent(_Strict):
    """``features`` (a base64 feature stream) or ``image_ref`` (32 hex characters): one of the two."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    features: str | None = None
    image_ref: str | None = None


class AlignedVQPart(_Strict):
    type: Literal["alignedvq"]
    alignedvq: AlignedVQContent


Part = Annotated[TextPart | ImageURLPart | AlignedVQPart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    """The fields of OpenAI's chat completion request that mean something here."""

    model: Annotated[str, Field(min_length=1, max_length=48)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=_MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_NEW_TOKENS


def _text(message: Message, where: str) -> str:
    if message.content is None:
        raise RequestError(f"{where}.content: expected text, got none", f"{where}.content")
    if isinstance(message.content, str):
        return message.content
    return "\n".join(part.text for part in message.content if isinstance(part, TextPart))


def _image(part: ImageURLPart | AlignedVQPart, where: str) -> tuple[str, bytes]:
    """The request field and bytes an image part carries."""
    if isinstance(part, AlignedVQPart):
        return read_chat_part(part.alignedvq.model_dump(exclude_none=True), f"{where}.{CHAT_PART_TYPE}")
    url = part.image_url.url
    header, comma, data = url.partition(",")
    media = header.removeprefix("data:").split(";")[0].lower()
    if not (header.startswith("data:") and comma and header.endswith(";base64")):
        raise RequestError(
            f"{where}.image_url.url: expected a data:image/...;base64, URL (the gateway fetches "
            f"nothing), got {url[:40]!r}",
            f"{where}.image_url.url",
        )
    if media not in _IMAGE_MEDIA:
        raise RequestError(
            f"{where}.image_url.url: expected one of {', '.join(_IMAGE_MEDIA)}, got {media or 'none'}",
            f"{where}.image_url.url",
        )
    try:
        return "image", base64.b64decode(data, validate=True)
    except binascii.Error:
        raise RequestError(
            f"{where}.image_url.url: expected standard base64", f"{where}.image_url.url"
        ) from None


def to_request(chat: ChatRequest, request_id: str) -> VQARequest:
    """The VQARequest a chat asks for; RequestError naming the message at fault."""
    turns = [(i, m) for i, m in enumerate(chat.messages) if m.role in ("user", "assistant")]
    if not turns or turns[-1][1].role != "user":
        raise RequestError("messages: the last message must be the user's question", "messages")
    images: list[tuple[str, bytes]] = []
    for n, (i, message) in enumerate(turns):
        where = f"messages[{i}]"
        expected = "assistant" if n % 2 else "user"
        if message.role != expected:
            raise RequestError(
                f"{where}.role: user and assistant messages alternate, from the user's first question "
                f"to the one to answer; expected {expected}, got {message.role}",
                f"{where}.role",
            )
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImageURLPart | AlignedVQPart):
                    if message.role != "user":
                        raise RequestError(f"{where}.content[{j}]: images come in user messages", where)
                    images.append(_image(part, f"{where}.content[{j}]"))
    if len(images) != 1:
        raise RequestError(
            f"messages: expected one image per conversation (an image_url with a data: URL, or an "
            f"{CHAT_PART_TYPE} part), got {len(images)}",
            "messages",
        )
    texts = [_text(message, f"messages[{i}]") for i, message in turns]
    if len(texts) > 2 * MAX_HISTORY_TURNS + 1:
        raise RequestError(
            f"messages: expected at most {MAX_HISTORY_TURNS} earlier question/answer turns, "
            f"got {(len(texts) - 1) // 2}",
            "messages",
        )
    if not texts[-1].strip():
        last = turns[-1][0]
        raise RequestError(f"messages[{last}]: the question has no text", f"messages[{last}].content")
    field, payload = images[0]
    fields: dict[str, Any] = {
        "request_id": request_id,
        "model": chat.model,
        "question": texts[-1],
        field: payload,
        "max_new_tokens": chat.max_new_tokens,
        "history": texts[:-1],
    }
    try:
        return parse_request(fields)
    except RequestError as exc:
        raise RequestError(f"messages: {exc.message}", "messages") from None


def finish_reason(response: VQAResponse, max_new_tokens: int) -> str:
    return "length" if response.completion_tokens >= max_new_tokens else "stop"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class AlignedVQInfo(BaseModel):
    """Our extension of the completion: the ``image_ref`` to follow up with, words the model does
    not know, and where the time went."""

    image_ref: str | None
    unknown_words: list[str]
    queue_ms: float
    compute_ms: float
    batch_size: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    alignedvq: AlignedVQInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    alignedvq: AlignedVQInfo | None = None


def _usage(response: VQAResponse) -> Usage:
    total = response.prompt_tokens + response.completion_tokens
    return Usage(
        prompt_tokens=response.prompt_tokens, completion_tokens=response.completion_tokens, total_tokens=total
    )


def _info(response: VQAResponse) -> AlignedVQInfo:
    return AlignedVQInfo(
        image_ref=response.image_ref.hex() if response.image_ref is not None else None,
        unknown_words=response.unknown_words,
        queue_ms=response.queue_ms,
        compute_ms=response.compute_ms,
        batch_size=response.batch_size,
    )


def completion(response: VQAResponse, created: int, max_new_tokens: int) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{response.request_id}",
        created=created,
        model=response.model,
        choices=[
            Choice(
                message=AssistantMessage(content=response.answer),
                finish_reason=finish_reason(response, max_new_tokens),
            )
        ],
        usage=_usage(response),
        alignedvq=_info(response),
    )


def chunk(
    request_id: str,
    created: int,
    model: str,
    delta: Delta | None,
    *,
    done: tuple[VQAResponse, int] | None = None,
    usage: VQAResponse | None = None,
) -> ChatCompletionChunk:
    """One streamed chunk: a ``delta``; the last one (``done``: the reply and ``max_new_tokens``)
    with its finish reason and our extension; or, with ``usage``, the usage chunk (no choices)."""
    choices = []
    if delta is not None:
        choices.append(ChunkChoice(delta=delta))
    if done is not None:
        choices.append(ChunkChoice(delta=Delta(), finish_reason=finish_reason(*done)))
    return ChatCompletionChunk(
        id=f"chatcmpl-{request_id}",
        created=created,
        model=model,
        choices=choices,
        usage=_usage(usage) if usage is not None else None,
        alignedvq=_info(done[0]) if done is not None else None,
    )


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorBody(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``: OpenAI's error object, our code."""

    error: OpenAIError


def error_object(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
