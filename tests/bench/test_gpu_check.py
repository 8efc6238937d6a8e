"""``make gpu-check`` (bench/gpu/) on a machine without a GPU: its arguments, the no-CUDA refusal, the bound,
the sizing of the KV layouts phase, the report rendered from fixed figures, the wheel download command, and
the whole flow as a CPU dry run on the tiny architecture (real model service and api processes)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import kv_bench
from bench.gpu import __main__ as gpu_main
from bench.gpu import plan as gpu_plan
from bench.gpu import wheels
from bench.gpu.bound import copy_bandwidth, decode_bound, step_time_bound, weight_bytes
from bench.gpu.checkpoint import architecture
from bench.gpu.report import (
    DecodeRow,
    GpuReport,
    KvLayoutRow,
    MediaCheck,
    TargetRow,
    TtftRow,
    render_markdown,
)
from tests.helpers.env import REPO

# --------------------------------------------------------------------------------------------- arguments


def test_defaults() -> None:
    args = gpu_plan.parse_args([])
    assert args.out == gpu_plan.DEFAULT_OUT
    assert args.model_dir == gpu_plan.DEFAULT_MODEL_DIR
    assert args.timeout == 480.0
    assert not (args.quick or args.skip_stack or args.cpu_dry_run)


def test_every_flag(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path / "r.md"), "--model-dir", str(tmp_path / "m"), "--quick", "--skip-stack"]
    args = gpu_plan.parse_args([*argv, "--timeout", "90", "--cpu-dry-run"])
    assert (args.out, args.model_dir, args.timeout) == (tmp_path / "r.md", tmp_path / "m", 90.0)
    assert args.quick and args.skip_stack and args.cpu_dry_run


@pytest.mark.parametrize("value", ["0", "-5", "abc", "3601", "nan"])
def test_bad_timeout_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_plan.parse_args(["--timeout", value])
    assert exc.value.code == 2
    assert "--timeout" in capsys.readouterr().err


def test_out_must_be_a_file_and_model_dir_a_directory(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_plan.parse_args(["--out", str(tmp_path)])
    assert exc.value.code == 2
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as exc:
        gpu_plan.parse_args(["--model-dir", str(a_file)])
    assert exc.value.code == 2


def test_plan_cuda_is_the_2b_in_bf16_and_quick_is_shorter() -> None:
    full = gpu_plan.Plan.from_args(gpu_plan.parse_args([]))
    quick = gpu_plan.Plan.from_args(gpu_plan.parse_args(["--quick"]))
    assert (full.device, full.dtype_name, full.decode_batches) == ("cuda", "bfloat16", (1, 16, 64))
    assert full.arch["text_config"]["hidden_size"] == 2048
    assert quick.decode_tokens < full.decode_tokens and quick.ttft_runs < full.ttft_runs


def test_plan_dry_run_is_the_tiny_architecture_on_cpu() -> None:
    dry = gpu_plan.Plan.from_args(gpu_plan.parse_args(["--cpu-dry-run"]))
    assert (dry.device, dry.device_map, dry.dtype_name) == ("cpu", "cpu", "float32")
    assert dry.arch["text_config"]["hidden_size"] == 8


def test_plan_kv_phase_is_shorter_when_quick_and_tiny_in_the_dry_run() -> None:
    full = gpu_plan.Plan.from_args(gpu_plan.parse_args([]))
    quick = gpu_plan.Plan.from_args(gpu_plan.parse_args(["--quick"]))
    dry = gpu_plan.Plan.from_args(gpu_plan.parse_args(["--cpu-dry-run"]))
    assert full.kv_rows == quick.kv_rows == dry.kv_rows == (16, 64)
    assert quick.kv_budget_s < full.kv_budget_s < 60  # well under a minute of the 8
    assert quick.kv_steps < full.kv_steps and dry.kv_steps < quick.kv_steps


def test_on_cuda_the_engine_runs_with_the_gpu_deployments_settings() -> None:
    """The GPU check measures what the GPU deployments run (tests/deploy check that those set the same),
    and its KV layouts phase adds the graphed layout there; a dry run keeps the CPU defaults."""
    cuda = gpu_plan.Plan.from_args(gpu_plan.parse_args([]))
    dry = gpu_plan.Plan.from_args(gpu_plan.parse_args(["--cpu-dry-run"]))
    assert dict(cuda.serving) == {"KV_LAYOUT": "slots", "KV_STATIC_SHAPES": "true", "CUDA_GRAPHS": "true"}
    assert dry.serving == () and dry.kv_layouts == len(kv_bench.LAYOUTS) == cuda.kv_layouts - 1


# --------------------------------------------------------------------------------- KV layouts sizing


def _kv_plan(**changes: Any) -> gpu_plan.Plan:
    """The full CUDA plan with ``changes``."""
    return dataclasses.replace(gpu_plan.Plan.from_args(gpu_plan.parse_args([])), **changes)


def test_step_times_come_from_the_decode_levels() -> None:
    """128 steps of 16 rows (2048 tokens) in 2.56 s: 20 ms a step; a level that made nothing is skipped."""
    rows = [DecodeRow(16, 2048, 2.56), DecodeRow(64, 0, 1.0)]
    assert gpu_plan.step_times(rows) == {16: pytest.approx(0.02)}


def test_step_estimate_never_guesses_low() -> None:
    steps = {1: 0.01, 16: 0.02}
    assert gpu_plan.step_estimate(steps, 16, 9.0) == 0.02
    assert gpu_plan.step_estimate(steps, 8, 9.0) == 0.02  # the next larger batch measured
    assert gpu_plan.step_estimate(steps, 64, 9.0) == pytest.approx(0.08)  # scaled by rows
    assert gpu_plan.step_estimate({}, 64, 9.0) == 9.0


def test_kv_sizes_fit_the_budget_with_every_row_count_when_steps_are_fast() -> None:
    plan = _kv_plan(kv_budget_s=45.0, kv_steps=200, kv_min_steps=40, kv_repeats=2)
    measured, left_out = gpu_plan.kv_sizes(plan, {16: 0.015, 64: 0.02})
    assert [(m.rows, m.runs) for m in measured] == [(16, 2), (64, 2)] and not left_out
    assert all(40 <= m.steps <= 200 for m in measured)
    assert sum(m.estimate_s for m in measured) <= 45.0
    shares = (45.0 / 2, 45.0 - measured[0].estimate_s)  # an equal share of what is left
    for m, step_s, share in zip(measured, (0.015, 0.02), shares, strict=True):
        assert m.estimate_s == pytest.approx(gpu_plan.kv_cost(step_s, m.steps, m.runs, plan.kv_layouts))
        assert m.estimate_s <= share
        assert gpu_plan.kv_cost(step_s, m.steps + 1, m.runs, plan.kv_layouts) > share  # the most that fit


def test_kv_sizes_cap_steps_at_the_plans_most() -> None:
    measured, _ = gpu_plan.kv_sizes(_kv_plan(kv_steps=200), {16: 1e-4, 64: 1e-4})
    assert [(m.steps, m.runs) for m in measured] == [(200, 2), (200, 2)]


def test_kv_sizes_drop_to_one_run_then_leave_64_rows_out_when_steps_are_slow() -> None:
    plan = _kv_plan(kv_budget_s=45.0, kv_steps=200, kv_min_steps=40, kv_repeats=2)
    measured, left_out = gpu_plan.kv_sizes(plan, {16: 0.05, 64: 0.2})
    assert [(m.rows, m.runs) for m in measured] == [(16, 1)] and measured[0].steps >= 40
    assert [(m.rows, m.steps) for m in left_out] == [(64, 40)]
    assert left_out[0].estimate_s > 45.0 - measured[0].estimate_s


def test_kv_sizes_always_measure_the_first_row_count() -> None:
    """Even when its estimate is over the whole budget, 16 rows run at the fewest steps, once."""
    measured, left_out = gpu_plan.kv_sizes(_kv_plan(kv_min_steps=40), {16: 1.0, 64: 2.0})
    assert [(m.rows, m.steps, m.runs) for m in measured] == [(16, 40, 1)]
    assert [m.rows for m in left_out] == [64]


# ------------------------------------------------------------------------------------------- refusal


def test_without_cuda_it_refuses_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(gpu_main, "cuda_available", lambda: False)
    out = tmp_path / "report.md"
    assert gpu_main.main(["--out", str(out), "--model-dir", str(tmp_path / "m")]) == gpu_plan.EXIT_NO_CUDA
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--cpu-dry-run" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "m").exists()


# --------------------------------------------------------------------------------------------- bound


def test_bound_of_the_notes_example() -> None:
    """4.3 GB read at 4.3 TB/s: 1 ms per step, 1000 steps/s; 16 rows share each step."""
    assert step_time_bound(4_300_000_000, 4.3e12) == pytest.approx(1e-3)
    assert decode_bound(4_300_000_000, 4.3e12, 1) == pytest.approx(1000.0)
    assert decode_bound(4_300_000_000, 4.3e12, 16) == pytest.approx(16_000.0)


@pytest.mark.parametrize(
    ("nbytes", "bandwidth", "batch"), [(0, 1.0, 1), (1, 0.0, 1), (1, 1.0, 0), (-1, 1.0, 1)]
)
def test_bound_refuses_non_positive_values(nbytes: int, bandwidth: float, batch: int) -> None:
    with pytest.raises(ValueError):
        decode_bound(nbytes, bandwidth, batch)


def test_the_2b_config_has_the_public_parameter_count() -> None:
    """Built on the meta device (no memory): 2.128 B parameters with tied embeddings, as the model card."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**architecture()))
    sizes = weight_bytes(model.to(torch.bfloat16))
    assert 2.12e9 < sizes.parameters < 2.14e9
    assert sizes.total == 2 * sizes.parameters  # bf16
    # the decoder (text model + tied head) is what a decode step reads: ~1.72 B parameters, not the vision
    assert 3.4e9 < sizes.decode < 3.5e9


def test_cpu_copy_bandwidth_is_measured() -> None:
    assert copy_bandwidth("cpu", nbytes=4 << 20, repeats=2) > 1e8  # > 0.1 GB/s on any machine


# -------------------------------------------------------------------------------------------- report


def _fake_report() -> GpuReport:
    return GpuReport(
        mode="cuda",
        device="NVIDIA H200",
        dtype="bfloat16",
        versions={"torch": "2.11.0", "transformers": "5.24.0"},
        parameters=2_127_532_032,
        total_bytes=4_255_064_064,
        decode_bytes=3_441_000_000,
        bandwidth=4.3e12,
        decode=[DecodeRow(1, 128, 0.5, 1249.6), DecodeRow(64, 8192, 4.0, None)],
        kv_layouts=[
            KvLayoutRow("concat", "KV_LAYOUT=concat", 16, 80, 2, 4, 20.0, 26.0),
            KvLayoutRow("slots", "KV_LAYOUT=slots", 16, 80, 2, 4, 21.0, 21.5),
            KvLayoutRow("slots-static", "KV_LAYOUT=slots + KV_STATIC_SHAPES=true", 16, 80, 2, 4, 24.0, 24.4),
            KvLayoutRow("concat", "KV_LAYOUT=concat", 64, 50, 2, 4, 30.0, 40.0),
            KvLayoutRow("slots", "KV_LAYOUT=slots", 64, 50, 2, 4, 30.5, 31.0),
        ],
        targets=[
            TargetRow("raw engine", 16, 32, 32, 2000.0, 0.05),
            TargetRow("api -> model service", 16, 32, 31, 1700.0, 0.0712, 0.85),
        ],
        ttft=[TtftRow("raw engine", 0.0423, 5, 1045)],
        media=[MediaCheck("video", "api", False, 0, 1.5, "HTTP 400: bad video")],
        notes=["a note"],
        failures=["requests: RuntimeError: boom"],
        started="2026-11-30 10:00:00",
        duration_s=321.4,
    )


def test_report_renders_every_section_from_fixed_figures() -> None:
    text = render_markdown(_fake_report())
    assert text.startswith("## GPU check (`make gpu-check`)\n")
    assert "cuda on NVIDIA H200 (bfloat16; torch 2.11.0, transformers 5.24.0); 321 s." in text
    assert "2.128 B parameters, 4.26 GB; one decode step reads the decoder's 3.44 GB." in text
    assert "Measured copy bandwidth 4300 GB/s" in text and "at least 0.80 ms, at most 1250 steps/s" in text
    assert "| 1 | 128 | 0.50 | 256.0 | 1249.6 | 20% |" in text
    assert "| 64 | 8192 | 4.00 | 2048.0 | - | - |" in text  # no bound: shown as such, no division
    assert "### KV layouts under churn\n" in text and "every 4 steps" in text
    assert "| rows | layout | steps x runs | steady ms/step | join-heavy ms/step | ratio |" in text
    assert "| 16 | KV_LAYOUT=concat | 80 x 2 | 20.00 | 26.00 | 1.30 |" in text
    assert "| 16 | KV_LAYOUT=slots + KV_STATIC_SHAPES=true | 80 x 2 | 24.00 | 24.40 | 1.02 |" in text
    assert "| 64 | KV_LAYOUT=slots | 50 x 2 | 30.50 | 31.00 | 1.02 |" in text
    assert (
        "- @16 rows: under churn KV_LAYOUT=slots was fastest (21.50 ms/step, 0.83x concat's); "
        "on the steady decode KV_LAYOUT=concat was fastest (20.00 ms/step)."
    ) in text
    assert (
        "- @64 rows: under churn KV_LAYOUT=slots was fastest (31.00 ms/step, 0.78x concat's); on the steady "
        "decode KV_LAYOUT=concat was fastest (30.00 ms/step), within 3% of KV_LAYOUT=slots: no clear winner."
    ) in text
    assert "| raw engine | 16 | 32/32 | 2000.0 | 50.0 | - |" in text
    assert "| api -> model service | 16 | 31/32 | 1700.0 | 71.2 | 0.85 |" in text
    assert "| raw engine | 1045 | 5 | 42.3 |" in text
    assert "| video | api | **no** | 0 | 1.50 | HTTP 400: bad video |" in text
    assert "### Notes\n\n- a note\n" in text
    assert "### Failures\n\n- requests: RuntimeError: boom\n" in text


def test_report_leaves_out_what_was_not_measured() -> None:
    text = render_markdown(GpuReport(mode="cpu dry run", failures=["checkpoint: OSError: disk full"]))
    for section in ("Decode", "KV layouts", "HTTP paths", "TTFT", "Requests", "Notes", "Model:", "bandwidth"):
        assert section not in text
    assert "- checkpoint: OSError: disk full" in text


# -------------------------------------------------------------------------------------------- wheels


def test_wheel_download_command_targets_cp312_manylinux_x86_64(tmp_path: Path) -> None:
    argv = wheels.download_command(["av==18.1.0"], tmp_path, python="py")
    assert argv[:4] == ["py", "-m", "pip", "download"]
    assert "--no-deps" in argv and "--only-binary=:all:" in argv
    assert argv[argv.index("--python-version") + 1] == "3.12"
    assert argv[argv.index("--implementation") + 1] == "cp"
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert "manylinux_2_28_x86_64" in platforms and "manylinux2014_x86_64" in platforms
    assert all(p.endswith("x86_64") for p in platforms)
    assert argv[-3:] == ["-d", str(tmp_path), "av==18.1.0"]


def test_wheels_are_pinned_to_this_environment() -> None:
    pins = dict(p.split("==") for p in wheels.pinned())
    assert set(pins) == set(wheels.PACKAGES) | set(wheels.OVERRIDES)
    assert pins["transformers"] == importlib.metadata.version("transformers")
    # the image's transformers stack is on hub 1.x; ours needs >= 1.31, and 2.x would need httpx2
    assert pins["huggingface-hub"].startswith("1.")
    assert {"fastapi", "uvicorn", "pydantic-settings", "av"} <= set(pins)


def test_install_command_is_offline(tmp_path: Path) -> None:
    (tmp_path / "b-1.whl").write_text("")
    (tmp_path / "a-1.whl").write_text("")
    argv = wheels.install_command(tmp_path, Path("/tmp/site"))
    assert "--no-index" in argv and "--no-deps" in argv
    assert argv[argv.index("--target") + 1] == "/tmp/site"
    assert argv[-2:] == [str(tmp_path / "a-1.whl"), str(tmp_path / "b-1.whl")]


# ------------------------------------------------------------------------------------ dry run, end to end


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_cpu_dry_run_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The whole flow on CPU: checkpoint written from the config, engine, decode levels, KV layouts at 16
    and 64 rows, model service and api as real processes, text/image/video through both, paths compared,
    image TTFT on every path."""
    out = tmp_path / "report.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TINY_MODEL_DIR": str(tiny_model_dir)}
    cmd = [sys.executable, "-m", "bench.gpu", "--cpu-dry-run", "--out", str(out)]
    cmd += ["--model-dir", str(tmp_path / "model"), "--timeout", "150"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "Failures" not in text
    for batch in (1, 16, 64):
        assert f"\n| {batch} | " in text
    assert "### KV layouts under churn" in text
    for rows in (16, 64):
        for setting in ("KV_LAYOUT=concat", "KV_LAYOUT=slots", "KV_LAYOUT=slots + KV_STATIC_SHAPES=true"):
            assert f"\n| {rows} | {setting} | 8 x 1 | " in text
        assert f"- @{rows} rows: under churn KV_LAYOUT=" in text
    for path in ("raw engine", "model service HTTP", "api -> model service"):
        assert f"| {path} | 1 | 16/16 |" in text and f"| {path} | 16 | 16/16 |" in text
        assert f"| {path} | 10" in text  # its 1024x1024 image TTFT row (10xx prompt tokens)
    for kind in ("text", "image", "video"):
        for via in ("model service", "api"):
            assert f"| {kind} | {via} | yes |" in text
    assert (tmp_path / "model" / "model.safetensors").exists()
