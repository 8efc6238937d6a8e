"""``make bench`` (g) and (h): the table, the turn summary, and one quick real run of both on the tiny
checkpoint (prefix cache hit on turn 2, figures present and positive)."""

from __future__ import annotations

from pathlib import Path

import pytest

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


def test_kv_table_prints_both_layouts_and_turns_side_by_side() -> None:
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
    text = kv_table([churn("concat", 3.5, 3.9), churn("slots", 3.0, 3.2)], _turn_summary(runs, 1024))
    assert "| (g) KV_LAYOUT=concat: mean ms/step @16 rows, 1 leave + 1 join every 4 steps |" in text
    assert "| 3.500 (steady) | 3.900 (decode 3.800) | 1.11 | ~1.0 |" in text
    assert "| 3.000 (steady) | 3.200 (decode 3.100) | 1.07 | ~1.0 |" in text
    assert "| 0.100 | 0.005 | 0.05 | <= 0.30 |" in text
    assert "| 0.200 | 0.120 | 0.60 | <= 0.30 |" in text
    assert "1040 of 1060 prompt tokens from the prefix cache" in text
    assert "(g) join-heavy, slots / concat: 0.82" in text


@pytest.mark.slow
def test_quick_kv_run_reuses_the_image_on_turn_2(tiny_model_dir: Path) -> None:
    from bench.kv_bench import run_kv

    result = run_kv(tiny_model_dir, quick=True)
    turns, churn = result["turns"], result["churn"]
    assert turns["turn2_cached_tokens"] > 1000  # the 1024x1024 image's 1024 visual tokens and more
    assert turns["turn2_engine_s"] < turns["turn1_engine_s"]
    assert [c["layout"] for c in churn] == ["concat", "slots"]
    assert all(c["steady_ms"] > 0 and c["join_heavy_ms"] > 0 for c in churn)
