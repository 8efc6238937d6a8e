"""What one GPU-check run does: its arguments and the plan they make (pure; no torch)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.gpu.checkpoint import architecture
from bench.servers import REPO

DEFAULT_OUT = REPO / "bench" / "results" / "gpu-check.md"
DEFAULT_MODEL_DIR = REPO / "tmp" / "gpu-check" / "model"
EXIT_NO_CUDA = 3


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
        )


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
