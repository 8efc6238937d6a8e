"""``make bench`` (g) and (h): the table, the turn summary, the CUDA-safe clock of (g), and one quick real
run of both on the tiny checkpoint (prefix cache hit on turn 2, figures present and positive)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench import kv_bench
from bench.kv_bench import _turn_summary, kv_table


def _turn(engine_s: float, e2e_s: float, prompt: int, cached: int) -> dict[str, float]:
    return {"engine_s": engine_s, "end_to_end_s": e2e_s, "prompt_tokens": prompt, "cached_tokens": cached}


def test_turn_summary_keeps_the_best_of_each_turn_and_both_ratios() -> None:
    runs = [
        (_turn(0.10, 0.20, 1000, 0), _turn(0.010, 0.12, 1060, 1040)),
        (_turn(0.08, 0.25, 1000, 0), _turn(0.012, 0.10, 1060, 1040)),
    ]
    out = _turn_summary(runs, 1024)
    assert out["turn1_engine_s"] == 0.08 and out["turn2_engine_s"] == 0.01
    assert out["ratio_engine"] == 0.125
    assert out["ratio_end_to_end"] == 0.5
    assert (out["turn2_prompt_tokens"], out["turn2_cached_tokens"]) == (1060, 1040)


def test_kv_table_prints_every_layout_and_turns_side_by_side() -> None:
    def churn(layout: str, steady: float, heavy: float) -> dict[str, object]:
        return {
            "layout": layout,
            "rows": 16,
            "churn_every": 4,
            "steady_ms": steady,
            "join_heavy_ms": heavy,
            "join_heavy_decode_ms": heavy - 0.1,
            "ratio": heavy / steady,
        }

    runs = [(_turn(0.1, 0.2, 1000, 0), _turn(0.005, 0.12, 1060, 1040))]
    layouts = [churn("concat", 3.5, 3.9), churn("slots", 3.0, 3.2), churn("slots-static", 2.0, 2.6)]
    text = kv_table(layouts, _turn_summary(runs, 1024))
    assert "| (g) KV_LAYOUT=concat: mean ms/step @16 rows, 1 leave + 1 join every 4 steps |" in text
    assert "| 3.500 (steady) | 3.900 (decode 3.800) | 1.11 | ~1.0 |" in text
    assert "| (g) KV_LAYOUT=slots: mean ms/step @16 rows" in text
    assert "| 3.000 (steady) | 3.200 (decode 3.100) | 1.07 | ~1.0 |" in text
    assert "| (g) KV_LAYOUT=slots + KV_STATIC_SHAPES=true: mean ms/step @16 rows" in text
    assert "| 2.000 (steady) | 2.600 (decode 2.500) | 1.30 | ~1.0 |" in text
    assert "| 0.100 | 0.005 | 0.05 | <= 0.30 |" in text
    assert "| 0.200 | 0.120 | 0.60 | <= 0.30 |" in text
    assert "1040 of 1060 prompt tokens from the prefix cache" in text
    assert "(g) join-heavy, slots / concat: 0.82" in text
    assert "(g) join-heavy, slots-static / concat: 0.67" in text


class _ClockLog:
    """Stands in for ``torch.cuda.synchronize`` and ``time.perf_counter``: records their calls in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.synced: list[Any] = []

    def synchronize(self, device: Any = None) -> None:
        self.events.append("sync")
        self.synced.append(device)

    def perf_counter(self) -> float:
        self.events.append("clock")
        return time.perf_counter()


@pytest.fixture
def clock_log(monkeypatch: pytest.MonkeyPatch) -> _ClockLog:
    """The model pretends to live on cuda:0: every clock read of (g) must first wait for that device."""
    import torch

    log = _ClockLog()
    monkeypatch.setattr(torch.cuda, "synchronize", log.synchronize)
    monkeypatch.setattr(kv_bench, "time", log)
    monkeypatch.setattr(kv_bench, "_cuda_devices", lambda model: (torch.device("cuda:0"),))
    return log


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Any:
    from tests.model.engine_support import load_tiny

    return load_tiny(tiny_model_dir)[0]


def test_on_cpu_the_clock_waits_for_nothing(tiny: Any) -> None:
    assert kv_bench._cuda_devices(tiny.model) == ()


@pytest.mark.parametrize("layout", kv_bench.LAYOUTS, ids=lambda x: x.name)
def test_on_cuda_every_clock_read_of_a_run_waits_for_the_device(
    tiny: Any, clock_log: _ClockLog, layout: kv_bench.KvLayout
) -> None:
    """6 steps with a leave + join every 3rd: 6 timed decodes and 2 timed churns, 2 clock reads each, every
    one right after a synchronisation of the model's device."""
    import torch

    with torch.inference_mode():
        prompts = kv_bench._start_prompts(5)
        states = [kv_bench._prefill_text(tiny.model, tiny.processor, p) for p in prompts]
        slots = kv_bench._slots(layout, 5)
        batch = kv_bench._start_batch(states, slots)
        devices = kv_bench._cuda_devices(tiny.model)
        clock_log.events.clear()
        dec, churn = kv_bench._run(tiny.model, batch, 6, 3, states[:2], slots, devices)
    assert clock_log.events == ["sync", "clock"] * (2 * 6 + 2 * 2)
    assert set(clock_log.synced) == {torch.device("cuda:0")}
    assert dec > 0 and churn > 0


def test_measure_churn_times_every_layout_at_the_rows_asked(tiny: Any, clock_log: _ClockLog) -> None:
    rows = kv_bench.measure_churn(tiny.model, tiny.processor, steps=4, churn_every=2, repeats=1, rows=5)
    assert [r["layout"] for r in rows] == ["concat", "slots", "slots-static"]
    assert all(r["rows"] == 5 and r["steps"] == 4 and r["churn_every"] == 2 for r in rows)
    assert all(r["steady_ms"] > 0 and r["join_heavy_ms"] > 0 for r in rows)
    assert clock_log.events == ["sync", "clock"] * (len(clock_log.events) // 2)


@pytest.mark.slow
def test_quick_kv_run_reuses_the_image_on_turn_2(tiny_model_dir: Path) -> None:
    from bench.kv_bench import run_kv

    result = run_kv(tiny_model_dir, quick=True)
    turns, churn = result["turns"], result["churn"]
    assert turns["turn2_cached_tokens"] > 1000  # the 1024x1024 image's 1024 visual tokens and more
    assert turns["turn2_engine_s"] < turns["turn1_engine_s"]
    assert [c["layout"] for c in churn] == ["concat", "slots", "slots-static"]
    assert all(c["steady_ms"] > 0 and c["join_heavy_ms"] > 0 for c in churn)
