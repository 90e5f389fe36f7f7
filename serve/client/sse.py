"""A server-sent events decoder (the WHATWG ``text/event-stream`` rules), fed one line at a time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None


class SSEDecoder:
    """Feed lines without their line ending; an event comes back at each blank line that ends one.
    Comments (``: keep-alive``) and unknown fields are skipped; ``data`` lines are joined by newlines."""

    def __init__(self) -> None:
        self._event, self._data, self._last_id = "", [], None

    def feed(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(event=self._event or "message", data="\n".join(self._data), id=self._last_id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._last_id = value
        return None
