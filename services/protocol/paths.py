"""Internal HTTP endpoints of the model service.

All but health/ready/metrics need INTERNAL_TOKEN when it is set, sent as ``Authorization: Bearer <token>``.

- ``POST  GENERATE``                  body GenerateRequest -> 200 NDJSON stream of events, or an error body
- ``GET   EVENTS.format(request_id)``  ``?after=N`` -> 200 NDJSON stream of the events with seq > N
                                       (running or recently finished generation: re-attach);
                                       404 when unknown or expired
- ``POST  CANCEL.format(request_id)``  -> 200 ``{"request_id", "status": "cancelled"|"finished"}``;
                                       404 unknown
- ``GET   STATUS``                     -> 200 LoadInfo JSON (for least-busy replica choice)
- ``GET   /health`` (process alive), ``GET /ready`` (200 when weights loaded, else 503 with the reason),
  ``GET /metrics``.
"""

from __future__ import annotations

from pydantic import BaseModel

GENERATE = "/internal/v1/generate"
EVENTS = "/internal/v1/generate/{request_id}/events"
CANCEL = "/internal/v1/cancel/{request_id}"
STATUS = "/internal/v1/status"


class LoadInfo(BaseModel):
    ready: bool
    model: str
    running: int
    queued: int
    max_batch_size: int
    max_queue: int


class CancelResult(BaseModel):
    request_id: str
    status: str
