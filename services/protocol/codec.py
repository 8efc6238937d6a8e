"""The one encoder/decoder of internal stream frames: newline-delimited JSON, one event per line.

Media type ``application/x-ndjson``. Both services use only these two functions.
"""

from __future__ import annotations

from pydantic import TypeAdapter

from services.protocol.events import Delta, Event, Finished

MEDIA_TYPE = "application/x-ndjson"

_adapter: TypeAdapter[Delta | Finished] | None = None


def _event_adapter() -> TypeAdapter[Delta | Finished]:
    # Built on first use, not at import time.
    global _adapter
    if _adapter is None:
        _adapter = TypeAdapter(Event)
    return _adapter


def encode_event(event: Delta | Finished) -> bytes:
    """One frame: the event's JSON followed by ``\\n``."""
    return event.__pydantic_serializer__.to_json(event) + b"\n"


def decode_event(line: bytes | str) -> Delta | Finished:
    """Parse one frame (with or without its trailing newline)."""
    return _event_adapter().validate_json(line)
