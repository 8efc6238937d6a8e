"""``make bench`` (f), the large-image stall, and the README's kept GPU section: rendering, and the
measurement itself at the service default only (the model's own 16384-token cap takes ~40 s here; `make
bench` runs it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import GPU_SECTION, keep_gpu_section, stall_table


def _row(cap: int, tokens: int, gap: float) -> dict[str, float | int]:
    return {
        "max_image_tokens": cap,
        "image_tokens": tokens,
        "prepare_seconds": 1.123,
        "worst_gap_seconds": gap,
        "image_first_token_seconds": gap + 0.01,
    }


def test_stall_table_names_both_caps() -> None:
    text = stall_table([_row(1280, 1225, 0.154), _row(16384, 16384, 23.7)], 1280)
    assert "| 1280 (service default) | 1225 | 1.12 | 0.15 | 0.16 |" in text
    assert "| 16384 (model's own) | 16384 | 1.12 | 23.70 | 23.71 |" in text


def test_a_bench_run_keeps_the_gpu_section_of_the_old_readme() -> None:
    old = f"# Benchmark results\n\nold table\n\n{GPU_SECTION} (`make gpu-check`)\n\n| a | b |\n"
    new = "# Benchmark results\n\nnew table\n"
    merged = keep_gpu_section(new, old)
    assert merged == f"# Benchmark results\n\nnew table\n\n{GPU_SECTION} (`make gpu-check`)\n\n| a | b |\n"
    assert keep_gpu_section(new, "# Benchmark results\n\nold table\n") == new
    assert keep_gpu_section(new, "") == new


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_run_stall_at_the_default_cap(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The real measurement path of (f), with the model's maximum replaced by the default (one fast run)."""
    import bench.report
    from bench.__main__ import run_stall
    from services.model.settings import ModelSettings

    default = ModelSettings.model_fields["max_image_tokens"].default
    monkeypatch.setattr(bench.report, "MODEL_MAX_IMAGE_TOKENS", default)
    run_stall(tmp_path, tiny_model_dir)
    rows = json.loads((tmp_path / "stall.json").read_text())
    assert [r["max_image_tokens"] for r in rows] == [default, default]
    for row in rows:
        assert 0 < row["image_tokens"] <= default
        assert 0 < row["worst_gap_seconds"] < 5.0  # bounded: the encoder work is chunked under the cap
