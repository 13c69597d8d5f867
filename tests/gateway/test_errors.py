"""One exception tree, unique codes, and an HTTP status for every one of them."""

from __future__ import annotations

import pytest

import edge_client.bundle  # noqa: F401  (registers every edge-side error class)
import edge_client.client  # noqa: F401
import gateway.errors as errors
from edge_client.errors import AlignedVQError, all_error_codes
from gateway.queue import Job, Reply


def test_every_code_is_unique_and_mapped() -> None:
    codes = all_error_codes()  # raises on a duplicate code
    assert set(codes) <= set(errors.HTTP_STATUS), sorted(set(codes) - set(errors.HTTP_STATUS))
    assert all(code == code.lower() and " " not in code for code in codes)


def test_gateway_errors_map_to_documented_statuses() -> None:
    expected = {
        errors.Unauthorized: 401,
        errors.UnknownModel: 404,
        errors.CodebookMismatch: 409,
        errors.BodyTooLarge: 413,
        errors.UnsupportedMediaType: 415,
        errors.StreamMismatch: 422,
        errors.Overloaded: 429,
        errors.RateLimited: 429,
        errors.DeadLettered: 502,
        errors.QueueUnavailable: 503,
        errors.DeadlineExceeded: 504,
    }
    for cls, status in expected.items():
        assert errors.http_status(cls("x")) == status


def test_a_later_subclass_maps_like_its_base() -> None:
    class NewOverload(errors.Overloaded):
        code = "brand_new_code"

    assert errors.http_status(NewOverload("x")) == 429


@pytest.mark.parametrize("cls", [c for c in all_error_codes().values() if issubclass(c, errors.ServerError)])
def test_worker_errors_round_trip_through_replies(cls: type[AlignedVQError]) -> None:
    job = Job("1-0", "m", "r", "reply", 0, 0, b"", "key:0")
    reply = Reply.unpack(Reply.failure(job, cls("what was expected, what arrived")).pack())
    with pytest.raises(cls, match="what was expected"):
        reply.response()


def test_unknown_and_client_side_codes_become_worker_errors() -> None:
    assert isinstance(errors.error_from_code("from_the_future", "?"), errors.WorkerError)
    assert isinstance(errors.error_from_code("gateway_timeout", "?"), errors.WorkerError)
    assert type(errors.error_from_code("corrupt_stream", "crc")).__name__ == "CorruptStreamError"
