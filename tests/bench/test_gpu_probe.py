"""The GPU probe's CPU side (``python -m bench.gpu.probe``): its parts run on the tiny checkpoint and print
what they measured; CUDA graphs are refused on CPU with the scheduler's warning and change no text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.gpu import probe
from tests.model.engine_support import tiny_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def test_the_layouts_run_through_the_scheduler_and_agree(
    engine: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        probe.graphs(engine, 4, 24)
    out = capsys.readouterr().out
    for name in probe.LAYOUTS:
        assert f"@4 {name}: " in out and " ms/step" in out
    assert "@4 graphs vs none: 4/4 rows with the same greedy text" in out
    assert "CUDA_GRAPHS=true has no effect here" in caplog.text


def test_rows_leave_at_staggered_steps(engine: Any) -> None:
    steps, ms, texts = probe.engine_in_thread(engine, 4, 24, stagger=3)
    assert sorted(texts) == [f"probe-{i}" for i in range(4)]
    # the longest request sets the step count: 24 tokens, the others 21, 18 and 15 (prefill steps aside)
    assert 24 <= steps <= 24 + 4 and ms > 0


def test_the_host_side_parts_print_their_figures(engine: Any, capsys: pytest.CaptureFixture[str]) -> None:
    probe.micro(torch.device("cpu"))
    assert probe.bare_loop(engine.loaded.model, 2, 4) > 0
    probe.profile("bare", torch.device("cpu"), lambda: probe.bare_loop(engine.loaded.model, 1, 2), rows=5)
    out = capsys.readouterr().out
    assert "us per x.add_(1)" in out and "[bare]" in out and "Self CPU time total" in out
