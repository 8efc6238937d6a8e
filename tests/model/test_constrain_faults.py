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


NOTHING = {"type": "string", "pattern": "[^\\s\\S]"}  # compiles; no string matches it
DEAD_END = "response_format: the output reached a part of this JSON schema that no value satisfies"


def test_a_schema_no_output_satisfies_ends_its_request_with_invalid_schema(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A hostile-input hunt: the grammar allowed `"`, then no token; the sampler picked a refused one and the
    # request failed as our fault (500, a traceback). Its neighbours, one with n = 3 of it, are unaffected.
    dead = ResponseFormat(type="json_schema", json_schema=NOTHING)
    reqs = [request(f"free{i}", f"tell me {i}", max_tokens=20, temperature=0.0) for i in range(2)]
    reqs.append(structured("dead", "describe it", budget=0, response_format=dead))
    wide = structured("dead-n3", "describe it", budget=0, response_format=dead)
    reqs.append(wide.model_copy(update={"sampling": wide.sampling.model_copy(update={"n": 3})}))
    reqs.append(structured("good", "describe good", response_format=FMT))
    clean, _ = run(engine, [r for r in reqs if not r.request_id.startswith("dead")])
    with caplog.at_level("WARNING"):
        rec, _ = run(engine, reqs)
    for rid in ("dead", "dead-n3"):
        final = rec.final(rid)
        assert final is not None and final.finish_reason == "error" and final.error_code == "invalid_schema"
        assert (final.error or "").startswith(DEAD_END)
    assert not [r for r in caplog.records if r.exc_info], "a dead end is the client's schema, no traceback"
    warned = [r.getMessage() for r in caplog.records if "dead end" in r.getMessage()]
    assert len(warned) == 2, warned  # one per request, the n = 3 one's siblings included
    for rid in ("free0", "free1", "good"):
        final, before = rec.final(rid), clean.final(rid)
        assert final is not None and before is not None and final.finish_reason == before.finish_reason
        assert rec.text(rid) == clean.text(rid)


def test_the_error_code_crosses_the_engine_process_wire() -> None:
    from services.model.engine import wire
    from services.model.engine.base import FinalOutput

    sent = FinalOutput("error", 12, 1, DEAD_END, 0, "invalid_schema")
    [(rid, got)] = wire.StepReport(packed=wire.pack_outputs([("r", sent)])).outputs()
    assert (rid, got) == ("r", sent)
