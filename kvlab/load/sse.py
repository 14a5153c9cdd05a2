"""Incremental Server-Sent Events parser: bytes in as they arrive off the socket, whole events out.

Network reads cut the stream anywhere: inside a line, between `\\r` and `\\n`, or inside a multi-byte UTF-8
character. The parser keeps that state between `feed` calls, so the caller can timestamp each event the moment
its last byte arrives (which is what TTFT and ITL need) without buffering the whole response.
Follows the WHATWG event-stream rules: `:` comment lines, `data:` lines joined with "\\n", one optional space
after the colon, `event`/`id`/`retry` fields, events dispatched on a blank line.
"""
from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"
_LINE_BREAK = re.compile("\r\n|\r|\n")


@dataclass(frozen=True)
class SSEEvent:
    """One dispatched event. `comment` events carry the text after `:` and no data."""

    data: str = ""
    event: str = "message"
    id: str | None = None
    retry: int | None = None
    comment: str | None = None

    @property
    def is_comment(self) -> bool:
        return self.comment is not None

    @property
    def is_done(self) -> bool:
        """OpenAI-style end-of-stream marker (`data: [DONE]`)."""
        return self.comment is None and self.data.strip() == DONE

    def json(self) -> Any:
        return json.loads(self.data)


class SSEParser:
    """Feed raw bytes; get the events completed by them.

    >>> p = SSEParser()
    >>> p.feed(b'data: {"a"') + p.feed(b': 1}\\n\\n')
    [SSEEvent(data='{"a": 1}', event='message', id=None, retry=None, comment=None)]
    """

    def __init__(self, *, comments: bool = True) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._line = ""  # partial line carried over to the next feed
        self._after_cr = False  # the previous chunk ended with "\r": a leading "\n" belongs to it
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._has_fields = False
        self._comments = comments
        self._first_line = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse `chunk` and return the events it completes (possibly none)."""
        text = self._decoder.decode(chunk)
        return self._consume(text)

    def close(self) -> list[SSEEvent]:
        """End of stream. Returns an event left without its closing blank line: the spec drops it, but some
        servers close right after the last `data:` line and the data is still wanted."""
        events = self._consume(self._decoder.decode(b"", final=True))
        if self._line:
            events.extend(self._process_line(self._line))
            self._line = ""
        if self._has_fields:
            events.extend(self._dispatch())
        return events

    def _consume(self, text: str) -> list[SSEEvent]:
        if not text:
            return []
        if self._after_cr and text.startswith("\n"):
            text = text[1:]
        self._after_cr = text.endswith("\r")
        events: list[SSEEvent] = []
        lines = _LINE_BREAK.split(self._line + text)
        self._line = lines.pop()  # the text after the last line break is an unfinished line
        for line in lines:
            events.extend(self._process_line(line))
        return events

    def _process_line(self, line: str) -> list[SSEEvent]:
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")  # a BOM may open the stream
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            if not self._comments:
                return []
            return [SSEEvent(comment=line[1:].removeprefix(" "))]
        field, sep, value = line.partition(":")
        if sep:
            value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
            self._has_fields = True
        elif field == "event":
            self._event = value
            self._has_fields = True
        elif field == "id":
            if "\0" not in value:
                self._id = value
            self._has_fields = True
        elif field == "retry":
            if value.isdigit():
                self._retry = int(value)
        # Unknown fields are ignored, as the spec requires.
        return []

    def _dispatch(self) -> list[SSEEvent]:
        if not self._data:
            # An event with no data is not dispatched (spec); its type is reset.
            self._event = ""
            self._has_fields = False
            return []
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._id,
                         retry=self._retry)
        self._data = []
        self._event = ""
        self._retry = None
        self._has_fields = False
        return [event]
