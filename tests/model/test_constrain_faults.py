"""A fault in the batched grammar masking (``apply_bitmasks``) or the greedy pick among allowed ids
(``pick_greedy``) fails only the rows at fault: the others are masked row by row and finish exactly as
without the fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.model.engine import scheduler as scheduler_module
from services.model.engine.grammar import apply_bitmasks, pick_greedy
from services.protocol.generate import ResponseFormat
from tests.model.engine_support import request, tiny_engine
from tests.model.test_structured import SCHEMA, run, structured

pytestmark = pytest.mark.integration

FMT = ResponseFormat(type="json_schema", json_schema=SCHEMA)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def batch(logprobs_rows: bool) -> list[Any]:
    """Greedy constrained rows (picked among allowed ids), or rows with logprobs (masked instead), with
    free neighbours; row ``bad`` is the one the injected fault hits."""
    extra = {"sampling": None}
    reqs = [request(f"free{i}", f"tell me {i}", max_tokens=30, temperature=0.0) for i in range(2)]
    for name in ("bad", "good0", "good1"):
        req = structured(name, f"describe {name}", response_format=FMT)
        if logprobs_rows:
            extra["sampling"] = req.sampling.model_copy(update={"top_logprobs": 2})
            req = req.model_copy(update=extra)
        reqs.append(req)
    return reqs


def poisoned(real: Any, holder: dict[str, Any]) -> Any:
    """``real`` raising whenever row ``bad`` is among the rows it is given."""

    def call(logits: Any, bitmask: Any, rows: list[int]) -> Any:
        if any(holder["sched"]._rows[i].request_id == "bad" for i in rows):
            raise RuntimeError("injected mask fault")
        return real(logits, bitmask, rows)

    return call


@pytest.mark.parametrize(
    ("name", "real", "logprobs_rows"),
    [
        ("apply_bitmasks", apply_bitmasks, True),
        ("pick_greedy", pick_greedy, False),
    ],
)
def test_a_masking_fault_fails_only_the_row_at_fault(
    engine: Any, monkeypatch: pytest.MonkeyPatch, name: str, real: Any, logprobs_rows: bool
) -> None:
    reqs = batch(logprobs_rows)
    clean, _ = run(engine, reqs)
    holder: dict[str, Any] = {}
    original = scheduler_module.Scheduler.bind

    def bind(self: Any, sink: Any) -> None:
        holder["sched"] = self
        original(self, sink)

    monkeypatch.setattr(scheduler_module.Scheduler, "bind", bind)
    monkeypatch.setattr(scheduler_module, name, poisoned(real, holder))
    faulted, _ = run(engine, reqs)
    bad = faulted.final("bad")
    assert bad is not None and bad.finish_reason == "error" and "injected mask fault" in (bad.error or "")
    for req in reqs:
        if req.request_id == "bad":
            continue
        final = faulted.final(req.request_id)
        assert final is not None and final.finish_reason != "error", final
        assert faulted.text(req.request_id) == clean.text(req.request_id), req.request_id
