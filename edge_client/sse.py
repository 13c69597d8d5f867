"""Server-Sent Events, the streaming format of ``POST /v1/vqa`` and ``/v1/chat/completions``.

Both sides import this module: the gateway writes events with :func:`format_event`, the client
reads them with :class:`EventParser`, which is fed one line at a time and holds no I/O (the
transport's drivers read the lines). The format is the WHATWG HTML standard's ("Server-sent
events", section 9.2): ``field: value`` lines, an event ends at a blank line, ``data`` lines join
with newlines, lines starting with ``:`` are comments (keep-alives).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MEDIA_TYPE", "EventParser", "ServerEvent", "format_event"]

MEDIA_TYPE = "text/event-stream"


@dataclass(frozen=True)
class ServerEvent:
    """One dispatched event; ``id`` is the stream's last event id when the event carried one."""

    event: str
    data: str
    id: str | None = None


def format_event(data: str, event: str | None = None, event_id: str | None = None) -> bytes:
    """One event as bytes on the wire (``data`` may span lines: each becomes a ``data:`` line)."""
    lines = [] if event_id is None else [f"id: {event_id}"]
    if event is not None:
        lines.append(f"event: {event}")
    lines += [f"data: {line}" for line in data.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


class EventParser:
    """Lines in, events out: :meth:`feed` returns an event when a blank line completes one."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> ServerEvent | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:  # the standard dispatches nothing without data
                self._event = ""
                return None
            event = ServerEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None
