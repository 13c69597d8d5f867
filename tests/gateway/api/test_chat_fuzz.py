"""Bad input to ``POST /v1/chat/completions``: generated JSON bodies (wrong types, unknown parts and
roles, broken data URLs and base64, odd conversations), zero 5xx, every error an OpenAI error
object whose code maps to the status sent."""

from __future__ import annotations

import base64

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client import chat_part, chat_ref_part
from gateway.errors import HTTP_STATUS

from ..helpers import AUTH, png

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def parts(features: bytes):
    url = "data:image/png;base64," + base64.b64encode(png(seed=4)).decode()
    image = st.sampled_from(
        [chat_part(features), chat_ref_part(features), {"type": "image_url", "image_url": {"url": url}}]
    )
    broken = st.sampled_from(
        [
            {"type": "image_url", "image_url": {"url": url[:-7]}},
            {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGOD=="}},
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
            {"type": "alignedvq", "alignedvq": {"features": "@@@"}},
            {"type": "alignedvq", "alignedvq": {"features": base64.b64encode(features[:-3]).decode()}},
            {"type": "alignedvq", "alignedvq": {}},
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        ]
    )
    text = st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=60))
    return st.one_of(image, broken, text, JSON)


def test_generated_chat_requests_get_4xx_never_5xx(served, model_name, encoder) -> None:
    client, worker, _ = served
    features = encoder.encode_image(png(seed=8))
    message = st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "user", "assistant", "system", "tool", "", 3]),
            "content": st.one_of(st.text(max_size=40), st.lists(parts(features), max_size=3), JSON),
        }
    )
    request = st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(message, max_size=4), JSON)},
        optional={
            "model": st.one_of(st.just(model_name), st.text(max_size=50), JSON),
            "max_tokens": st.one_of(st.integers(-2, 600), JSON),
            "stream": st.one_of(st.booleans(), JSON),
            "n": st.one_of(st.integers(0, 3), JSON),
            "temperature": JSON,
        },
    )
    statuses: set[int] = set()

    @settings(
        max_examples=300,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=request)
    def run(body: dict) -> None:
        reply = client.post("/v1/chat/completions", json=body, headers=AUTH)
        statuses.add(reply.status_code)
        assert reply.status_code < 500, (body, reply.text[:300])
        if reply.status_code >= 400:
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], error
            assert HTTP_STATUS[error["code"]] == reply.status_code, error

    run()
    assert 422 in statuses
    assert worker.worker.stats.failed == 0
