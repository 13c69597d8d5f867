"""Server-Sent Events: what the gateway writes, the client's parser reads back, line by line."""

from __future__ import annotations

from edge_client.sse import EventParser, ServerEvent, format_event


def parse(data: bytes) -> list[ServerEvent]:
    parser = EventParser()
    events = [parser.feed(line) for line in data.decode().split("\n")]
    return [event for event in events if event is not None]


def test_events_round_trip_with_ids_and_multiline_data() -> None:
    wire = (
        format_event('{"text": "red"}', "token", "17-0")
        + b": keep-alive\n\n"
        + format_event("two\nlines", "done")
        + format_event("[DONE]")
    )
    assert parse(wire) == [
        ServerEvent("token", '{"text": "red"}', "17-0"),
        ServerEvent("done", "two\nlines", "17-0"),  # the last id holds until another is sent
        ServerEvent("message", "[DONE]", "17-0"),
    ]


def test_the_standard_details_crlf_no_space_and_empty_events() -> None:
    parser = EventParser()
    lines = ["event: token\r\n", "data:{}\r\n", "\r\n", "event: nothing\n", "\n", "id\n", "data: x\n", "\n"]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [ServerEvent("token", "{}", None), ServerEvent("message", "x", "")]
