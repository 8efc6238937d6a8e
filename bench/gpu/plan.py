"""What one GPU-check run does: its arguments and the plan they make (pure; no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.gpu.checkpoint import architecture
from bench.gpu.report import DecodeRow
from bench.kv_bench import LAYOUTS, WARMUP_STEPS
from bench.servers import REPO

DEFAULT_OUT = REPO / "bench" / "results" / "gpu-check.md"
DEFAULT_MODEL_DIR = REPO / "tmp" / "gpu-check" / "model"
EXIT_NO_CUDA = 3
# What the GPU deployments set (deploy/docker/compose.yaml, deploy/k8s/model.yaml; tests/deploy check that
# they agree): slots with static shapes, replayed from CUDA graphs.
GPU_SERVING: tuple[tuple[str, str], ...] = (
    ("KV_LAYOUT", "slots"),
    ("KV_STATIC_SHAPES", "true"),
    ("CUDA_GRAPHS", "true"),
)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be in (0, 3600] seconds: {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; an invalid one exits with status 2 and a usage message (argparse)."""
    p = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description="GPU readiness check: Qwen3-VL-2B's architecture (random weights) on one CUDA GPU.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report to write (%(default)s)")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="where the random-weight checkpoint is written (reused when it matches) (%(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="shorter levels and fewer runs")
    p.add_argument(
        "--skip-stack", action="store_true", help="in-process engine only: no model service or api"
    )
    p.add_argument(
        "--timeout", type=_positive_seconds, default=480.0, help="seconds for the whole run (%(default)s)"
    )
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="the whole flow on CPU with the tiny architecture (tests the script; measures nothing useful)",
    )
    args = p.parse_args(argv)
    if args.out.is_dir():
        p.error(f"--out {args.out} is a directory; name a file")
    if args.model_dir.exists() and not args.model_dir.is_dir():
        p.error(f"--model-dir {args.model_dir} exists and is not a directory")
    return args


@dataclass(frozen=True, slots=True)
class Plan:
    """The shapes, sizes and limits of one run."""

    mode: str  # "cuda" | "cpu dry run"
    device: str  # torch device for building the weights and the bandwidth copy
    device_map: str  # the services' DEVICE_MAP
    dtype_name: str  # torch dtype name of the weights
    arch: dict
    decode_batches: tuple[int, ...]
    decode_tokens: int
    path_levels: tuple[int, ...]
    path_tokens: int
    level_cap: int  # most requests in one level of the path comparison
    level_time_limit: float
    ttft_runs: int
    copy_bytes: int
    torch_threads: int  # 0: the service's own choice
    start_timeout: float  # per service
    kv_rows: tuple[int, ...] = (16, 64)  # row counts of the KV layouts phase, the first always measured
    kv_steps: int = 200  # most decode steps of one KV layouts run
    kv_min_steps: int = 40  # fewer than this: a later row count is left out
    kv_repeats: int = 2  # runs of each kind; each figure the best of them
    kv_budget_s: float = 45.0  # the KV layouts phase's estimated seconds, all row counts together
    kv_default_step_s: float = 0.05  # decode step estimate when the decode levels measured nothing near
    kv_layouts: int = len(LAYOUTS)  # layouts the KV layouts phase measures (CUDA: + the graphed one)
    # the model settings the engine and the model service run with (environment names): on CUDA those the
    # GPU deployments set (deploy/docker/compose.yaml, deploy/k8s/model.yaml); none in a dry run
    serving: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.cpu_dry_run:
            return cls(
                mode="cpu dry run",
                device="cpu",
                device_map="cpu",
                dtype_name="float32",
                arch=architecture(tiny=True),
                decode_batches=(1, 16, 64),
                decode_tokens=8,
                path_levels=(1, 16),
                path_tokens=8,
                level_cap=16,
                level_time_limit=30.0,
                ttft_runs=1,
                copy_bytes=16 << 20,
                torch_threads=1,
                start_timeout=120.0,
                kv_steps=8,
                kv_min_steps=4,
                kv_repeats=1,
                kv_budget_s=30.0,
                kv_default_step_s=0.02,
            )
        return cls(
            mode="cuda",
            device="cuda",
            device_map="cuda",
            dtype_name="bfloat16",
            arch=architecture(),
            decode_batches=(1, 16, 64),
            decode_tokens=32 if args.quick else 128,
            path_levels=(1, 16),
            path_tokens=32 if args.quick else 128,
            level_cap=32 if args.quick else 64,
            level_time_limit=60.0 if args.quick else 120.0,
            ttft_runs=2 if args.quick else 5,
            copy_bytes=1 << 30,
            torch_threads=0,
            start_timeout=240.0,
            kv_steps=100 if args.quick else 200,
            kv_min_steps=20 if args.quick else 40,
            kv_repeats=1 if args.quick else 2,
            kv_budget_s=20.0 if args.quick else 45.0,
            kv_layouts=len(LAYOUTS) + 1,
            serving=GPU_SERVING,
        )


# Every step of the KV layouts phase taken as this many decode steps: a join at the 2B's dimensions costs
# about one decode step (issue 14) and comes every 4th step of half the runs, plus the batches' set-up.
KV_STEP_OVERHEAD = 1.3


@dataclass(frozen=True, slots=True)
class KvSize:
    """One row count of the KV layouts phase: ``runs`` runs of each kind of ``steps`` decode steps, and the
    seconds it is estimated to take."""

    rows: int
    steps: int
    runs: int
    estimate_s: float


def step_times(decode: Sequence[DecodeRow]) -> dict[int, float]:
    """Seconds per decode step at each measured batch: ``seconds`` / (``tokens`` / ``batch``). The prompts'
    prefill is in ``seconds``, so the estimate is on the high side."""
    return {d.batch: d.seconds * d.batch / d.tokens for d in decode if d.tokens > 0 and d.seconds > 0}


def step_estimate(steps: Mapping[int, float], rows: int, default: float) -> float:
    """Seconds per decode step at ``rows`` rows: the time measured at that batch, else at the next larger
    batch measured (a step never gets faster with more rows), else at the largest one scaled by
    ``rows / batch``; ``default`` when nothing was measured."""
    if rows in steps:
        return steps[rows]
    larger = [b for b in steps if b > rows]
    if larger:
        return steps[min(larger)]
    if steps:
        largest = max(steps)
        return steps[largest] * rows / largest
    return default


def kv_cost(step_s: float, steps: int, runs: int, layouts: int = len(LAYOUTS)) -> float:
    """Estimated seconds of ``bench.kv_bench.measure_churn`` over ``layouts`` layouts: a warm-up run per
    layout, then ``runs`` x (steady + join-heavy) runs of ``steps`` steps per layout."""
    return layouts * (WARMUP_STEPS + 2 * runs * steps) * step_s * KV_STEP_OVERHEAD


def _steps_within(seconds: float, step_s: float, runs: int, layouts: int) -> int:
    """The most steps per run for which :func:`kv_cost` stays within ``seconds``."""
    per_layout = seconds / (layouts * step_s * KV_STEP_OVERHEAD)
    return int((per_layout - WARMUP_STEPS) // (2 * runs))


def kv_sizes(plan: Plan, steps: Mapping[int, float]) -> tuple[list[KvSize], list[KvSize]]:
    """(measured, left out): the row counts of ``plan.kv_rows`` sized to fit ``plan.kv_budget_s`` by the
    decode step times ``steps`` (:func:`step_times`). Each row count gets an equal share of what is left:
    ``plan.kv_repeats`` runs of up to ``plan.kv_steps`` steps, else one run; one that does not fit
    ``plan.kv_min_steps`` steps is left out, except the first, which always runs at least that."""
    measured: list[KvSize] = []
    left_out: list[KvSize] = []
    remaining = plan.kv_budget_s
    for i, rows in enumerate(plan.kv_rows):
        step_s = step_estimate(steps, rows, plan.kv_default_step_s)
        share = remaining / (len(plan.kv_rows) - i)
        runs = plan.kv_repeats
        n = min(plan.kv_steps, _steps_within(share, step_s, runs, plan.kv_layouts))
        if n < plan.kv_min_steps and runs > 1:
            runs = 1
            n = min(plan.kv_steps, _steps_within(share, step_s, runs, plan.kv_layouts))
        n = max(n, plan.kv_min_steps)
        size = KvSize(rows, n, runs, kv_cost(step_s, n, runs, plan.kv_layouts))
        if size.estimate_s > share and i > 0:
            left_out.append(size)
            continue
        measured.append(size)
        remaining -= size.estimate_s
    return measured, left_out


def cuda_available() -> bool:
    """True when torch imports and sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


NO_CUDA_MESSAGE = (
    "gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with an "
    "NVIDIA GPU, or pass --cpu-dry-run to exercise the flow on CPU with the tiny architecture"
)
