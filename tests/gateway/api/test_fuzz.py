"""Bad-input fuzzing: thousands of malformed requests, zero 5xx, and the service keeps answering.

One gateway (real Redis queue, small limits) and one real worker thread on the tiny model are
shared by the module. Hypothesis generates, deterministically (``derandomize``), requests in nine
families: random bytes, truncated valid bodies, wrong types per field, huge declared msgpack
lengths, forged stream headers (bit widths, G/S/K, coder, payload, CRC), unknown models and
codebooks, oversized questions, bad images (non-images, PNG bombs declaring huge sizes, a
10k x 10k image a few KB on disk) and random methods/paths/headers on every route.

The bar, checked on every reply: no 5xx; every error is ``{"error": {"code", "message"}}`` with a
code from :data:`gateway.errors.HTTP_STATUS` whose status is the one sent, and a non-empty message.
After each family a valid request is answered; at the end the worker has rejected and failed
nothing (every bad input was refused by the gateway) and at least ``MIN_TOTAL`` requests were sent.
"""

from __future__ import annotations

import random
import struct
import time
import uuid
import zlib
from collections import Counter, defaultdict
from urllib.parse import quote

import msgpack
import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_client.protocol import CONTENT_TYPE
from gateway.api.main import create_app
from gateway.errors import HTTP_STATUS
from gateway.queue import Keys

from ..conftest import WorkerThread, gateway_settings, worker_settings
from ..helpers import API_KEY, AUTH, HEADERS, delete_prefix, png, rid, wait_for

MAX_BODY = 100_000
MAX_QUESTION = 40
MIN_TOTAL = 5_000
FAMILIES = (
    "random_bytes",
    "truncated",
    "wrong_types",
    "huge_lengths",
    "stream_headers",
    "unknown_model_codebook",
    "oversized_question",
    "bad_images",
    "routes",
)


def fuzz(max_examples: int):
    """Deterministic (CI-stable), no deadline (a busy machine is not a failure), no example database."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


class Tally:
    """Sends requests and checks every reply against the bar; counts them per family."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.sent: Counter[str] = Counter()
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.messages: dict[str, Counter[str]] = defaultdict(Counter)
        self.answered = 0  # 200s from /v1/vqa: the still_serving checks, and inputs valid after all
        self.seconds = 0.0

    def request(self, family: str, method: str, url: str, *, content: bytes = b"", headers=None):
        reply = self.client.request(method, url, content=content, headers=headers or {})
        self.sent[family] += 1
        status = reply.status_code
        assert status < 500, (family, method, url, status, reply.text[:500])
        if status >= 400 and method != "HEAD":
            data = reply.json()
            assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
            code, message = data["error"]["code"], data["error"]["message"]
            assert HTTP_STATUS.get(code) == status, (family, status, data)
            assert isinstance(message, str) and message.strip(), data
            assert "Traceback" not in message
            self.codes[family][code] += 1
            self.messages[family][message[:60]] += 1
        elif status >= 400:
            self.codes[family][f"HEAD {status}"] += 1
        elif status == 200 and method == "POST" and url == "/v1/vqa":
            self.answered += 1
        return reply

    def post(self, family: str, content: bytes, **headers):
        return self.request(family, "POST", "/v1/vqa", content=content, headers={**HEADERS, **headers})


@pytest.fixture(scope="module")
def env(redis_url, runner):
    """Module-wide gateway + worker: ``(tally, worker thread, redis client, prefix)``."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    worker = WorkerThread(runner, worker_settings(redis_url, prefix)).start()
    # Random Authorization headers from one address would trip the failed-auth limit (its own tests
    # cover it); here every generated request must reach the validation it targets.
    settings_ = gateway_settings(
        redis_url,
        prefix,
        max_body_bytes=MAX_BODY,
        max_question_chars=MAX_QUESTION,
        auth_failures_per_minute=0,
    )
    with TestClient(create_app(settings_)) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness")
        r = redis.Redis.from_url(redis_url)
        yield Tally(client), worker, r, prefix
        r.close()
    worker.stop()
    delete_prefix(redis_url, prefix)


@pytest.fixture(scope="module")
def tally(env) -> Tally:
    return env[0]


@pytest.fixture(scope="module")
def valid(model_name, encoder) -> dict:
    """A valid request map (edge-cloud) and a valid cloud-only one, as Python dicts."""
    image = png(seed=7)
    base = {"v": 1, "request_id": "fuzz", "model": model_name, "question": "what shape is it ?"}
    return {
        "features": {**base, "features": encoder.encode_image(image, entropy=False)},
        "image": {**base, "image": image},
    }


def pack(data) -> bytes:
    """msgpack of ``data``; the placeholder id ``fuzz`` becomes a fresh one, since a request id
    names one request (reusing it for different content is a 409 of its own)."""
    if isinstance(data, dict) and data.get("request_id") == "fuzz":
        data = {**data, "request_id": rid()}
    return msgpack.packb(data, use_bin_type=True)


def still_serving(tally: Tally, valid: dict) -> None:
    before = tally.answered
    reply = tally.post("check", pack({**valid["features"], "request_id": rid()}))
    assert reply.status_code == 200 and tally.answered == before + 1, reply.text


@pytest.fixture(autouse=True)
def _timed(request, env):
    start = time.perf_counter()
    yield
    env[0].seconds += time.perf_counter() - start


# ---- 1. random bytes ------------------------------------------------------------------------------


def test_random_bytes(tally, valid) -> None:
    prefixes = st.sampled_from([b"", b"\x80", b"\x81", b"\x88", b"\x8f", b"\xde\x00\x08", b"\xc1", b"\x92"])

    @fuzz(800)
    @given(prefix=prefixes, tail=st.binary(max_size=200))
    def run(prefix: bytes, tail: bytes) -> None:
        reply = tally.post("random_bytes", prefix + tail)
        assert reply.status_code in (404, 413, 422), reply.text

    run()
    still_serving(tally, valid)


# ---- 2. truncated valid bodies ------------------------------------------------------------------


def test_truncated_valid_bodies(tally, valid) -> None:
    bodies = [pack(valid["features"]), pack(valid["image"])]

    @fuzz(500)
    @given(which=st.sampled_from([0, 1]), cut=st.floats(0, 1, exclude_max=True))
    def run(which: int, cut: float) -> None:
        content = bodies[which]
        reply = tally.post("truncated", content[: int(cut * len(content))])
        assert reply.status_code == 422 and reply.json()["error"]["code"] == "bad_request", reply.text

    run()
    still_serving(tally, valid)


# ---- 3. wrong types per field -------------------------------------------------------------------

ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.lists(st.integers(0, 9), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=3),
)
FIELD_TYPES = {
    "v": int,
    "request_id": str,
    "model": str,
    "question": str,
    "features": bytes,
    "image": bytes,
    "max_new_tokens": int,
    "timeout_ms": int,
}


OPTIONAL = {"features", "image", "timeout_ms"}  # nil is a legal value of these


def wrong_type(field: str):
    expected = FIELD_TYPES[field]
    # bool is an int subclass in Python but a distinct msgpack type, refused by strict validation.
    return ANY.filter(lambda value: type(value) is not expected and not (value is None and field in OPTIONAL))


def test_wrong_types_per_field(tally, valid) -> None:
    fields = st.sampled_from(sorted(FIELD_TYPES))

    @fuzz(800)
    @given(data=st.data(), mode=st.sampled_from(["features", "image"]), field=fields)
    def run(data, mode: str, field: str) -> None:
        request = dict(valid[mode])
        action = data.draw(st.sampled_from(["wrong", "wrong", "wrong", "drop", "extra"]))
        if action == "wrong":
            request[field] = data.draw(wrong_type(field))
        elif action == "drop":  # a required field
            del request[data.draw(st.sampled_from(["request_id", "model", "question", mode]))]
        else:
            request[data.draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELD_TYPES))] = 1
        reply = tally.post("wrong_types", pack(request))
        assert reply.status_code == 422, reply.text

    run()
    still_serving(tally, valid)


# ---- 4. huge declared lengths -------------------------------------------------------------------

# msgpack headers that declare a length: bin8/16/32, str8/16/32, array16/32, map16/32, ext8/16/32.
LENGTH_HEADERS = {
    b"\xc4": ">B",
    b"\xc5": ">H",
    b"\xc6": ">I",
    b"\xd9": ">B",
    b"\xda": ">H",
    b"\xdb": ">I",
    b"\xdc": ">H",
    b"\xdd": ">I",
    b"\xde": ">H",
    b"\xdf": ">I",
    b"\xc7": ">B",
    b"\xc8": ">H",
    b"\xc9": ">I",
}


def test_huge_declared_lengths(tally, valid) -> None:
    @fuzz(400)
    @given(
        marker=st.sampled_from(sorted(LENGTH_HEADERS)),
        length=st.one_of(st.just(2**31), st.just(2**32 - 1), st.integers(0, 2**32 - 1)),
        where=st.sampled_from(["body", "features", "image", "question", "model"]),
        tail=st.binary(max_size=40),
    )
    def run(marker: bytes, length: int, where: str, tail: bytes) -> None:
        fmt = LENGTH_HEADERS[marker]
        length &= (1 << (8 * struct.calcsize(fmt))) - 1
        value = marker + struct.pack(fmt, length) + tail
        if where == "body":
            content = value
        else:  # a valid map whose last value is the forged one: a fixmap header, the rest, the splice
            request = {k: v for k, v in valid["features"].items() if k != where}
            content = bytes([0x80 | (len(request) + 1)]) + pack(request)[1:] + pack(where) + value
        reply = tally.post("huge_lengths", content)
        assert reply.status_code in (404, 422), reply.text

    run()
    still_serving(tally, valid)


# ---- 5. forged stream headers: bit widths, G/S/K, coder, payload --------------------------------

_FIELDS = struct.Struct(">8sBBHBBHBBII")  # edge_client.bitstream's header layout, see its docstring


def forge_stream(model: bytes, digest: bytes, fields: tuple, payload: bytes, *, crc_ok: bool) -> bytes:
    prefix = b"AVQ\x01" + bytes([len(model)]) + model
    body = _FIELDS.pack(digest, *fields, len(payload), 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(prefix + body)) if crc_ok else 0xDEADBEEF
    return prefix + body + crc.to_bytes(4, "big") + payload


def expected_payload(values: dict, coder: int) -> int:
    """Bytes of payload a header with these raw fields declares valid (packed indices + stats)."""
    bits = max(1, values["size_minus_one"].bit_length())  # bits_for(K), K = size_minus_one + 1
    stats = (values["tokens"] * 2 * values["stat_bits"] + 7) // 8
    packed = (values["tokens"] * values["groups"] * values["stages"] * bits + 7) // 8
    return (packed if coder == 0 else max(1, packed // 2)) + stats


def test_forged_stream_headers(tally, valid, runner) -> None:
    info = runner.info
    served = {
        "kind": 1,
        "k": 0,
        "tokens": info.tokens,
        "groups": info.groups,
        "stages": info.stages,
        "size_minus_one": info.codebook_size - 1,
        "stat_bits": info.stat_bits,
    }
    ranges = {"kind": 3, "k": 255, "tokens": 0xFFFF, "groups": 255, "stages": 255, "size_minus_one": 0xFFFF}
    ranges["stat_bits"] = 20
    small = {"tokens": 40, "groups": 4, "stages": 4, "size_minus_one": 300}  # sizes worth sending

    @fuzz(800)
    @given(
        data=st.data(),
        mutate=st.sets(st.sampled_from(sorted(served)), max_size=3),
        coder=st.sampled_from([0, 0, 1, 1, 2, 255]),
        size=st.sampled_from(["exact", "exact", "exact", "off_by_one", "random"]),
        seed=st.integers(0, 2**32),
        crc_ok=st.sampled_from([True, True, True, False]),  # mostly valid: the fields get parsed
    )
    def run(data, mutate, coder, size, seed, crc_ok) -> None:
        values = dict(served)
        for name in mutate:
            high = data.draw(st.sampled_from([ranges[name], small.get(name, ranges[name])]))
            values[name] = data.draw(st.integers(0, high), label=name)
        if coder == 0 and values == served:
            coder = 1  # served geometry + packed indices of the right size is a valid stream
        n = expected_payload(values, coder)
        if size == "random" or n > 4096:
            n = data.draw(st.integers(0, 80))
        elif size == "off_by_one":
            n = max(0, n + data.draw(st.sampled_from([-1, 1])))
        payload = random.Random(seed).randbytes(n)
        fields = tuple(
            values[name] for name in ("kind", "k", "tokens", "groups", "stages", "size_minus_one")
        ) + (coder, values["stat_bits"])
        digest = bytes.fromhex(info.codebook_hash[:16])
        stream = forge_stream(info.name.encode(), digest, fields, payload, crc_ok=crc_ok)
        reply = tally.post("stream_headers", pack({**valid["features"], "features": stream}))
        # 200 only if random rANS bytes happen to decode to a valid stream: then it is one.
        assert reply.status_code in (200, 409, 422), reply.text

    run()
    still_serving(tally, valid)


# ---- 6. unknown models and codebooks ------------------------------------------------------------


def test_unknown_models_and_codebooks(tally, valid, runner) -> None:
    stream = valid["features"]["features"]
    header_end = 5 + stream[4] + _FIELDS.size
    model = runner.info.name.encode()

    @fuzz(500)
    @given(
        name=st.text(min_size=1, max_size=60).filter(lambda n: n != runner.info.name),
        digest=st.binary(min_size=8, max_size=8),
        which=st.sampled_from(["request", "header", "codebook"]),
    )
    def run(name: str, digest: bytes, which: str) -> None:
        request = dict(valid["features"])
        if which == "request":
            request["model"] = name
        else:
            fields = list(_FIELDS.unpack_from(stream, 5 + len(model)))
            new_model = model
            if which == "header":
                new_model = name.encode()[:255]
            else:
                fields[0] = digest if digest != fields[0] else bytes(8)
            payload = stream[header_end:]
            request["features"] = forge_stream(new_model, fields[0], tuple(fields[1:9]), payload, crc_ok=True)
        reply = tally.post("unknown_model_codebook", pack(request))
        assert reply.status_code in (404, 409, 422), reply.text

    run()
    still_serving(tally, valid)


# ---- 7. oversized questions ---------------------------------------------------------------------


def test_oversized_questions(tally, valid) -> None:
    @fuzz(300)
    @given(
        size=st.one_of(st.integers(MAX_QUESTION + 1, 1100), st.integers(1100, 20_000)),
        char=st.characters(codec="utf-8", exclude_categories=["Cs"]),
        mode=st.sampled_from(["features", "image"]),
    )
    def run(size: int, char: str, mode: str) -> None:
        reply = tally.post("oversized_question", pack({**valid[mode], "question": char * size}))
        assert reply.status_code == 422, reply.text
        assert reply.json()["error"]["code"] in ("question_too_long", "bad_request")

    run()
    still_serving(tally, valid)


# ---- 8. bad images (cloud-only mode) ------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def forge_png(width: int, height: int, depth: int, color: int, idat: bytes | None) -> bytes:
    """A PNG declaring ``width x height`` whose pixel data is ``idat`` (tiny whatever the size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    chunks = png_chunk(b"IHDR", ihdr) + (png_chunk(b"IDAT", idat) if idat is not None else b"")
    return PNG_SIGNATURE + chunks + png_chunk(b"IEND", b"")


def blank_png(width: int, height: int) -> bytes:
    """A real, decodable 1-bit ``width x height`` PNG, a few KB on disk (zeros compress well)."""
    rows = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)
    idat = b"".join(rows.compress(row) for _ in range(height)) + rows.flush()
    return forge_png(width, height, 1, 0, idat)


IMAGE_MAGIC = [
    PNG_SIGNATURE,
    b"\xff\xd8\xff\xe0",  # JPEG
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"%!PS-Adobe-3.0 EPSF-3.0\n",  # EPS: never handed to Ghostscript, the format is not accepted
    b"\x00\x00\x01\x00",  # ICO
]


def test_bad_images(tally, valid) -> None:
    fixed = [
        (blank_png(10_000, 10_000), "bomb"),  # 100 M pixels: Pillow's bomb guard
        (blank_png(7_000, 7_000), "7000x7000"),  # under Pillow's guard, over VQA_MAX_IMAGE_PIXELS
        (forge_png(2**31 - 1, 2**31 - 1, 8, 2, zlib.compress(b"\x00" * 64)), "bomb"),  # declares 2^62 px
        (b"definitely not an image", "PNG"),
    ]
    for image, needle in fixed:
        assert len(image) < MAX_BODY
        reply = tally.post("bad_images", pack({**valid["image"], "image": image}))
        assert reply.status_code == 422 and reply.json()["error"]["code"] == "bad_image", reply.text
        assert needle in reply.json()["error"]["message"]

    forged = st.builds(
        forge_png,
        width=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
        height=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
        depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0, 255]),
        color=st.sampled_from([0, 2, 3, 4, 6, 1, 7]),
        idat=st.one_of(st.none(), st.binary(max_size=64), st.binary(max_size=64).map(zlib.compress)),
    )
    magic = st.builds(lambda m, tail: m + tail, st.sampled_from(IMAGE_MAGIC), st.binary(max_size=120))
    real = png(seed=9)
    truncated = st.builds(lambda cut: real[:cut], st.integers(1, len(real) - 1))

    @fuzz(600)
    @given(image=st.one_of(forged, magic, truncated))
    def run(image: bytes) -> None:
        reply = tally.post("bad_images", pack({**valid["image"], "image": image}))
        # A forged PNG can, rarely, be a valid tiny image: then it is answered (200).
        assert reply.status_code in (200, 422), reply.text

    run()
    still_serving(tally, valid)


# ---- 9. every route: random methods, paths, headers, bodies -------------------------------------

ROUTES = [
    "/",
    "/v1",
    "/v1/vqa",
    "/v1/models",
    "/v1/models/{model}/edge-bundle",
    "/v1/models/{random}/edge-bundle",
    "/v1/models/{random}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/docs",
    "/openapi.json",
    "/{random}",
    "/v1/{random}",
]
HEADER_NAMES = [
    "Content-Type",
    "Content-Length",
    "Accept",
    "If-None-Match",
    "Origin",
    "X-Forwarded-For",
    "Transfer-Encoding",
    "Expect",
    "Cookie",
    "Range",
]
PRINTABLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)


AUTHORIZATION = st.one_of(
    st.just(f"Bearer {API_KEY}"),
    st.builds(
        lambda scheme, token: scheme + token,
        st.sampled_from(["Bearer ", "Basic ", "bearer ", ""]),
        st.text(PRINTABLE, max_size=80),
    ),
)


def header_value(name: str):
    if name == "Content-Type":
        return st.sampled_from(
            [CONTENT_TYPE, "application/json", "text/plain", "multipart/form-data; boundary=x", ""]
        )
    if name == "Content-Length":
        return st.sampled_from(["0", "1", "2147483648", "99999999999999999999", "-1", "abc", " 12"])
    if name == "Transfer-Encoding":
        return st.sampled_from(["chunked", "gzip", "identity"])
    return st.text(PRINTABLE, max_size=60)


def test_every_route_random_methods_paths_headers(tally, valid, model_name) -> None:
    @fuzz(1000)
    @given(
        data=st.data(),
        method=st.sampled_from(
            ["GET", "GET", "GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
        ),
        route=st.sampled_from(ROUTES),
        segment=st.text(max_size=30),
        query=st.text(PRINTABLE, max_size=30),
        names=st.sets(st.sampled_from(HEADER_NAMES), max_size=4),
        auth=st.one_of(st.none(), AUTHORIZATION),
        content=st.one_of(st.just(b""), st.binary(max_size=100), st.just(pack(valid["features"]))),
    )
    def run(data, method, route, segment, query, names, auth, content) -> None:
        path = route.replace("{model}", model_name).replace("{random}", quote(segment, safe="") or "x")
        url = f"{path}?{quote(query, safe='=&')}" if query else path
        headers = {name: data.draw(header_value(name), label=name) for name in sorted(names)}
        if auth is not None:
            headers["Authorization"] = auth
        if "Content-Length" in headers:
            del headers["Content-Length"]  # httpx sets it from the body; a forged one is tested below
        if method in ("GET", "HEAD", "OPTIONS", "DELETE"):
            content = b""
        tally.request("routes", method, url, content=content, headers=headers)

    run()
    # A declared length the body does not have, and one over the cap.
    for declared in ("2147483648", "100001"):
        reply = tally.request(
            "routes", "POST", "/v1/vqa", content=b"\x80", headers={**HEADERS, "Content-Length": declared}
        )
        assert reply.status_code == 413, reply.text
    assert tally.client.get("/v1/models", headers=AUTH).status_code == 200
    still_serving(tally, valid)


# ---- the whole run ------------------------------------------------------------------------------


def test_worker_saw_no_bad_input_and_the_count_is_reached(env, valid, model_name) -> None:
    """Runs last: the valid request is answered, the worker refused and failed nothing (the
    gateway refused every bad input), the queue is empty, and enough requests were sent."""
    tally, worker, r, prefix = env
    still_serving(tally, valid)
    stats = worker.worker.stats
    assert stats.rejected == 0 and stats.failed == 0, stats
    # Each 200 was computed once (retries of a request id get the stored answer), checks included.
    assert tally.sent["check"] <= stats.answered <= tally.answered, (stats, tally.answered)
    assert r.xlen(Keys(prefix).stream(model_name)) == 0
    ran = set(tally.sent) - {"check"}
    if ran != set(FAMILIES):
        pytest.skip(f"the total is checked when every family runs; ran {sorted(ran)}")
    total = sum(tally.sent.values())
    print(f"\nfuzz: {total} requests in {tally.seconds:.1f} s; per family {dict(tally.sent)}")
    for family in FAMILIES:
        print(f"  {family}: {dict(tally.codes[family])}")
        print(f"    top messages: {tally.messages[family].most_common(3)}")
    assert total >= MIN_TOTAL, dict(tally.sent)
