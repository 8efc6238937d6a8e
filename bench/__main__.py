"""``python -m bench`` (``make bench``): one run, every target, side by side.

(a) the raw engine in-process at 1 and 16 streams; (b) the full stack (nginx -> api -> model) single stream,
which is (c)'s first level; (c) the full stack at 1, 4, 16 and 64 streams; (d) ``transformers serve`` on the
same checkpoint and workload; (e) structured outputs (bench/structured.py); (f) how long one 4095x4095 image
stalls a running stream, at the service's default MAX_IMAGE_TOKENS vs the model's own 16384; (g) mean step
time at 16 rows while rows join and leave vs steady and (h) TTFT of turn 2 of a chat about a 1024x1024 image
vs turn 1 (bench/kv_bench.py). All targets are
started first and stay up (idle ones cost nothing); then, level by level, each target runs its load back to
back, so that drifting machine load skews the ratios as little as possible. Prints the table and the target
ratios, writes bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.cpu import CpuMeter
from bench.engine_bench import RawEngine
from bench.http_client import ChatTarget, make_client
from bench.loadgen import LevelResult, Send, closed_loop, level_sizes, warm_up
from bench.report import RAW, STACK, TFS, compute_ratios, level_table, ratio_table, write_outputs
from bench.servers import BENCH_RATE_LIMIT, REPO, Stack, TransformersServe
from bench.steps import StepTotals
from bench.workload import Workload

log = logging.getLogger("bench")

LEVELS = (1, 4, 16, 64)
RAW_LEVELS = (1, 16)
QUICK_LEVELS = (1, 16)
RATIO_LEVELS = (1, 16)  # the levels the targets compare: repeated (--repeats), the best run kept
TFS_CAP = 64  # transformers serve generates one request at a time: its 64-stream level gets one each


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    send: Send
    levels: tuple[int, ...]
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid of each server process tree
    cap: int | None = None  # most requests in one level (default: --cap)
    steps: Callable[[], StepTotals] | None = None  # the engine's step totals, where they can be read


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="levels 1 and 16, short outputs (smoke test)")
    p.add_argument("--skip-transformers-serve", action="store_true", help="leave out (d)")
    p.add_argument("--skip-stack", action="store_true", help="leave out (b) and (c)")
    p.add_argument("--skip-raw", action="store_true", help="leave out (a)")
    p.add_argument(
        "--skip-structured",
        action="store_true",
        help="leave out (e): raw engine @16, half the rows grammar-constrained vs none",
    )
    p.add_argument(
        "--skip-stall",
        action="store_true",
        help="leave out (f): a running stream's worst stall while a 4095x4095 image is prefilled, "
        "at MAX_IMAGE_TOKENS' default vs the model's own 16384",
    )
    p.add_argument(
        "--skip-kv",
        action="store_true",
        help="leave out (g) step time at 16 rows while rows join and leave, (h) chat turn 2 vs turn 1 TTFT",
    )
    p.add_argument("--kv-only", action="store_true", help="run only (g) and (h)")
    p.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "tiny-qwen3-vl")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 128, --quick 16)")
    p.add_argument("--cap", type=int, default=128, help="most requests in one level")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of every target's levels 1 and 16; the best (by tok/s) is kept (default 3, quick 1)",
    )
    p.add_argument("--level-time-limit", type=float, default=None, help="seconds per level (240; quick 60)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="experiment: intra-op threads of every torch process (raw engine, model service, "
        "transformers serve); default: each one's own default",
    )
    return p.parse_args(argv)


def ensure_checkpoint(model_dir: Path) -> Path:
    from services.model.tiny_checkpoint import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(model_dir).resolve()


async def start_targets(
    exits: contextlib.AsyncExitStack,
    args: argparse.Namespace,
    workload: Workload,
    model_dir: Path,
    work: Path,
    notes: list[str],
) -> list[Target]:
    levels = QUICK_LEVELS if args.quick else LEVELS
    limit = args.level_time_limit or (60.0 if args.quick else 240.0)
    targets: list[Target] = []
    if not args.skip_raw:
        raw = RawEngine(model_dir, workload, args.torch_threads)
        exits.push_async_callback(raw.stop)
        await raw.start()
        targets.append(Target(RAW, raw.send, tuple(c for c in levels if c in RAW_LEVELS), steps=raw.steps))
    client = await exits.enter_async_context(make_client(max(levels) * 2 + 8, timeout=limit))
    servers: list[Stack | TransformersServe] = []
    if not args.skip_stack:
        servers.append(Stack(model_dir, work / "stack", torch_threads=args.torch_threads))
    if not args.skip_transformers_serve:
        servers.append(TransformersServe(model_dir, work / "tfs", torch_threads=args.torch_threads))
    for server in servers:
        exits.push_async_callback(asyncio.to_thread, server.stop)
    await asyncio.gather(*(asyncio.to_thread(s.start) for s in servers))
    for server in servers:
        if isinstance(server, Stack):
            ours = ChatTarget(client, server.edge_url, server.model_id, workload, include_usage=True)
            targets.append(Target(STACK, ours.send, levels, server.pids(), steps=server.steps))
        else:
            theirs = await tfs_target(client, server, workload, notes)
            cap = min(args.cap, TFS_CAP)
            targets.append(Target(TFS, theirs.send, levels, server.pids(), cap=cap))
    return targets


async def tfs_target(client, server: TransformersServe, workload: Workload, notes: list[str]) -> ChatTarget:
    """``transformers serve``: no ``stream_options`` (on its list of unsupported fields); images only if
    it can answer one."""
    probe = ChatTarget(client, server.url, server.model_id, workload, include_usage=False)
    result = await probe.send(workload.image_every - 1)  # the first image request of the workload
    if not result.ok:
        notes.append(f"transformers serve failed an image request ({result.error}): text only")
        workload = Workload(max_tokens=workload.max_tokens, image_every=0, png=workload.png)
    if server.log_has("does not support continuous batching"):
        notes.append(
            "transformers serve was started with --continuous-batching, logged that "
            "Qwen3VLForConditionalGeneration does not support it and fell back to sequential generation"
        )
    return ChatTarget(client, server.url, server.model_id, workload, include_usage=False, leading_echo="\n")


async def measure(targets: Sequence[Target], args: argparse.Namespace) -> list[LevelResult]:
    """Level by level, every target back to back; RATIO_LEVELS ``repeats`` times, keeping each target's
    best run. Other work on a shared machine only ever slows a run down, so the fastest of a few runs is
    the closest to what the target can do (timeit's reasoning); every run's tok/s is recorded."""
    repeats = args.repeats or (1 if args.quick else 3)
    for target in targets:
        await warm_up(target.send, 2 if args.quick else 8, concurrency=4)
    results: list[LevelResult] = []
    for concurrency in sorted({c for t in targets for c in t.levels}):
        runs: dict[str, list[LevelResult]] = {t.name: [] for t in targets}
        for rep in range(repeats):
            for target in targets:
                if concurrency in target.levels and (rep == 0 or concurrency in RATIO_LEVELS):
                    runs[target.name].append(await run_level(target, concurrency, args))
        results += [_best(rs) for rs in runs.values() if rs]
    order = {t.name: i for i, t in enumerate(targets)}
    return sorted(results, key=lambda r: (order[r.target], r.concurrency))


async def run_level(target: Target, concurrency: int, args: argparse.Namespace) -> LevelResult:
    limit = args.level_time_limit or (60.0 if args.quick else 240.0)
    n = level_sizes(concurrency, args.quick, target.cap or args.cap)
    meter = CpuMeter(target.processes)
    steps_before = await _steps(target)
    meter.start()
    records = await closed_loop(target.send, concurrency, n, limit)
    result = LevelResult.from_records(target.name, concurrency, records)
    result.cpu_s = meter.stop()
    steps_after = await _steps(target)
    if steps_before is not None and steps_after is not None:
        steps = steps_after.minus(steps_before)
        result.engine_step_ms, result.engine_rows = steps.step_ms, steps.rows_per_step
    log.info("%s @%d: %.1f tok/s, %d/%d ok", target.name, concurrency, result.tok_s, result.ok, n)
    return result


async def _steps(target: Target) -> StepTotals | None:
    """The target's step totals; None when it has none or they cannot be read (a level whose server died
    records its errors, it does not stop the bench)."""
    if target.steps is None:
        return None
    try:
        return await asyncio.to_thread(target.steps)
    except httpx.HTTPError as exc:
        log.warning("%s: engine steps unreadable (%s)", target.name, exc)
        return None


def _best(runs: list[LevelResult]) -> LevelResult:
    chosen = max(runs, key=lambda r: (r.errors == 0, r.tok_s))
    chosen.tok_s_runs = [round(r.tok_s, 1) for r in runs]
    return chosen


def run_notes(workload: Workload) -> list[str]:
    return [
        f"workload: max_tokens={workload.max_tokens}, temperature 0, one request in {workload.image_every} "
        "with a 64x64 PNG (data URL), the same prompts in the same order for every target",
        "(b) full stack single stream = the full stack's concurrency-1 level of (c)",
        "levels 1 and 16 of every target run several times, back to back with the other targets; the "
        "table shows each one's fastest run (other work on this shared machine only slows runs down); "
        "every run's tok/s is in results.json (tok_s_runs)",
        "engine ms/step and rows/step: the engine's own step counts in that level (the raw engine's "
        "observer, the model service's model_step_duration_seconds and model_batch_size); tok/s ~ rows "
        "per step / seconds per step, so they tell whether a slower target lost batch rows (time spent "
        "between client and engine) or step time (the engine sharing the CPU with the stack's other "
        "processes)",
        f"transformers serve's levels have at most {TFS_CAP} requests (it generates one at a time)",
        "levels run back to back per concurrency (raw engine, full stack, transformers serve), "
        "all servers up and the idle ones idle",
        f"the edge's per-client rate limit is raised to {BENCH_RATE_LIMIT} for the benchmark (one client, "
        "up to 64 streams); everything else is the production config",
    ]


async def run(args: argparse.Namespace) -> int:
    if args.kv_only:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(run_kv_parts, args, ensure_checkpoint(args.model_dir))
        return 0
    workload = Workload.build(args.max_tokens or (16 if args.quick else 128))
    model_dir = ensure_checkpoint(args.model_dir)
    notes = run_notes(workload)
    started, load_before, t0 = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        async with contextlib.AsyncExitStack() as exits:
            targets = await start_targets(exits, args, workload, model_dir, Path(tmp), notes)
            results = await measure(targets, args)
    ratios = compute_ratios(results)
    meta = {
        "started": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        # Other work on the machine skews every number; the 1-minute load before and after tells.
        "load_avg_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "config": {
            "max_tokens": workload.max_tokens,
            "quick": args.quick,
            "model": model_dir.name,
            "torch_threads": args.torch_threads or "default",
        },
        "notes": notes,
    }
    write_outputs(args.out_dir, meta, results, ratios)
    print(level_table(results))
    print(ratio_table(ratios))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.out_dir}/results.json, bench.png, README.md in {meta['duration_s']} s")
    if not args.skip_structured:
        await run_structured(args, model_dir)
    if not args.skip_stall:
        await asyncio.to_thread(run_stall, args.out_dir, model_dir)
    if not args.skip_kv:
        await asyncio.to_thread(run_kv_parts, args, model_dir)
    return 0


def run_kv_parts(args: argparse.Namespace, model_dir: Path) -> None:
    """(g) the KV cache while rows join and leave, (h) chat turn 2 vs turn 1 TTFT: printed side by side,
    written to kv.json."""
    from bench.kv_bench import kv_table, run_kv

    result = run_kv(model_dir, quick=args.quick)
    (args.out_dir / "kv.json").write_text(json.dumps(result, indent=2) + "\n")
    print(kv_table(result["churn"], result["turns"]))


async def run_structured(args: argparse.Namespace, model_dir: Path) -> None:
    """(e) constrained decoding: tok/s at 16 streams, half the rows with a JSON schema vs none."""
    from bench import structured

    result = await structured.measure(
        model_dir, requests=32 if args.quick else 64, max_tokens=128, repeats=1 if args.quick else 2
    )
    (args.out_dir / "structured.json").write_text(json.dumps(result, indent=2) + "\n")
    print(structured.report(result))


def run_stall(out_dir: Path, model_dir: Path) -> None:
    """(f) How long one 4095x4095 image stalls a running stream (the in-process engine on the checkpoint),
    with the service's default per-image visual-token cap and with the model's own maximum, side by side."""
    from dataclasses import asdict

    from bench.report import MODEL_MAX_IMAGE_TOKENS, stall_table
    from services.model.engine.hf import HFEngine
    from services.model.settings import ModelSettings
    from tests.model.engine_support import load_tiny
    from tests.model.image_stall import measure_stall

    default = ModelSettings.model_fields["max_image_tokens"].default
    rows = []
    for cap in (default, MODEL_MAX_IMAGE_TOKENS):
        loaded, settings = load_tiny(model_dir, max_image_tokens=cap)
        rows.append({"max_image_tokens": cap, **asdict(measure_stall(HFEngine(loaded, settings)))})
    (out_dir / "stall.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(stall_table(rows, default))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
