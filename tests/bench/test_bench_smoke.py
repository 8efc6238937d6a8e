"""``python -m bench --quick`` end to end: every target runs, every ratio is computed, outputs are written.

Real processes (model service, api under gunicorn, nginx, transformers serve) on the tiny checkpoint with
quick-sized counts (levels 1 and 16, 16 tokens); about 40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.env import REPO, require_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_quick_bench_measures_every_target(tiny_model_dir: Path, tmp_path: Path) -> None:
    require_binary("nginx")
    require_binary("gunicorn")
    out = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bench", "--quick", "--model-dir", str(tiny_model_dir)]
    cmd += ["--out-dir", str(out), "--skip-stall"]  # (f) has its own test (test_stall_report)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((out / "results.json").read_text())
    by_target = {(lv["target"], lv["concurrency"]): lv for lv in data["levels"]}
    for target in ("raw engine", "full stack", "transformers serve"):
        for concurrency in (1, 16):
            level = by_target[(target, concurrency)]
            assert level["errors"] == 0, level
            assert level["ok"] == level["requests"] >= concurrency
            assert level["completion_tokens"] > 0 and level["tok_s"] > 0
            assert level["ttft_p50"] is not None and level["e2e_p99"] >= level["e2e_p50"]
            if target == "transformers serve":  # its engine's steps are not ours to count
                assert level["engine_step_ms"] is None and level["engine_rows"] is None
            else:
                assert level["engine_step_ms"] > 0 and 1 <= level["engine_rows"] <= concurrency
    assert len(data["ratios"]) == 5
    assert {r["status"] for r in data["ratios"]} <= {"PASS", "MISS"}
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    assert "| ratio |" in readme and "transformers serve" in readme
    assert "| ratio |" in proc.stdout and "engine ms/step / rows" in proc.stdout
    structured = json.loads((out / "structured.json").read_text())
    assert structured["tok_s_none"] > 0 and structured["tok_s_half_constrained"] > 0
    assert "half constrained" in proc.stdout
