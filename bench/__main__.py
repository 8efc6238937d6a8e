"""``python -m bench`` (``make bench``): one run, every target, side by side.

(a) the raw engine in-process at 1 and 16 streams; (b) the full stack (nginx -> api -> model) single stream,
which is (c)'s first level; (c) the full stack at 1, 4, 16 and 64 streams; (d) ``transformers serve`` on the
same checkpoint and workload. Prints the table and the target ratios, writes bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.engine_bench import run_raw_engine
from bench.http_client import ChatTarget, make_client
from bench.loadgen import LevelResult, closed_loop, level_sizes, warm_up
from bench.report import STACK, TFS, compute_ratios, level_table, ratio_table, write_outputs
from bench.servers import BENCH_RATE_LIMIT, REPO, Stack, TransformersServe
from bench.workload import Workload

log = logging.getLogger("bench")

STACK_LEVELS = (1, 4, 16, 64)
RAW_LEVELS = (1, 16)
QUICK_LEVELS = (1, 16)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small counts and short outputs (smoke test)")
    p.add_argument("--skip-transformers-serve", action="store_true", help="leave out (d)")
    p.add_argument("--skip-stack", action="store_true", help="leave out (b) and (c)")
    p.add_argument("--skip-raw", action="store_true", help="leave out (a)")
    p.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "tiny-qwen3-vl")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--max-tokens", type=int, default=None, help="per request (default 64, --quick 16)")
    p.add_argument("--cap", type=int, default=128, help="most requests in one level")
    p.add_argument("--level-time-limit", type=float, default=None, help="seconds per level (120; quick 60)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="experiment: intra-op threads of every torch process (raw engine, model service, "
        "transformers serve); default: each one's own default",
    )
    return p.parse_args(argv)


def ensure_checkpoint(model_dir: Path) -> Path:
    if not (model_dir / "config.json").exists():
        from services.model.tiny_checkpoint import build_tiny_checkpoint

        log.info("building the tiny checkpoint at %s", model_dir)
        build_tiny_checkpoint(model_dir)
    return model_dir.resolve()


async def run_http_levels(
    target_name: str, target: ChatTarget, levels: Sequence[int], args: argparse.Namespace, limit: float
) -> list[LevelResult]:
    await warm_up(target.send, 2 if args.quick else 8, concurrency=4)
    out = []
    for c in levels:
        records = await closed_loop(target.send, c, level_sizes(c, args.quick, args.cap), limit)
        result = LevelResult.from_records(target_name, c, records)
        log.info("%s @%d: %.1f tok/s, %d/%d ok", target_name, c, result.tok_s, result.ok, result.requests)
        out.append(result)
    return out


async def bench_stack(args, workload, model_dir, work, levels, limit) -> list[LevelResult]:
    stack = Stack(model_dir, work / "stack", torch_threads=args.torch_threads)
    try:
        await asyncio.to_thread(stack.start)
        async with make_client(max(levels) + 8, timeout=limit) as client:
            target = ChatTarget(client, stack.edge_url, stack.model_id, workload, include_usage=True)
            return await run_http_levels(STACK, target, levels, args, limit)
    finally:
        await asyncio.to_thread(stack.stop)


async def bench_transformers_serve(args, workload, model_dir, work, levels, limit, notes):
    server = TransformersServe(model_dir, work / "tfs", torch_threads=args.torch_threads)
    try:
        await asyncio.to_thread(server.start)
        async with make_client(max(levels) + 8, timeout=limit) as client:
            tfs_workload = workload
            probe = await ChatTarget(client, server.url, server.model_id, workload, include_usage=False).send(
                workload.image_every - 1
            )
            if not probe.ok:
                notes.append(f"transformers serve failed an image request ({probe.error}): text only")
                tfs_workload = Workload(max_tokens=workload.max_tokens, image_every=0, png=workload.png)
            # No stream_options: it is on transformers serve's list of unsupported fields.
            target = ChatTarget(client, server.url, server.model_id, tfs_workload, include_usage=False)
            results = await run_http_levels(TFS, target, levels, args, limit)
        if server.log_has("does not support continuous batching"):
            notes.append(
                "transformers serve was started with --continuous-batching, logged that "
                "Qwen3VLForConditionalGeneration does not support it and fell back to sequential generation"
            )
        return results
    finally:
        await asyncio.to_thread(server.stop)


async def run(args: argparse.Namespace) -> int:
    quick = args.quick
    workload = Workload.build(args.max_tokens or (16 if quick else 64))
    limit = args.level_time_limit or (60.0 if quick else 120.0)
    stack_levels = QUICK_LEVELS if quick else STACK_LEVELS
    model_dir = ensure_checkpoint(args.model_dir)
    notes: list[str] = [
        f"workload: max_tokens={workload.max_tokens}, temperature 0, one request in {workload.image_every} "
        "with a 64x64 PNG (data URL), the same prompts in the same order for every target",
        "(b) full stack single stream = the full stack's concurrency-1 level of (c)",
        f"the edge's per-client rate limit is raised to {BENCH_RATE_LIMIT} for the benchmark (one client, "
        "up to 64 streams); everything else is the production config",
    ]
    results: list[LevelResult] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        if not args.skip_raw:
            log.info("(a) raw engine in-process")
            results += await run_raw_engine(
                model_dir,
                workload,
                RAW_LEVELS,
                quick=quick,
                cap=args.cap,
                time_limit=limit,
                warmup=2 if quick else 4,
                torch_threads=args.torch_threads,
            )
        if not args.skip_stack:
            log.info("(b)+(c) full stack")
            results += await bench_stack(args, workload, model_dir, work, stack_levels, limit)
        if not args.skip_transformers_serve:
            log.info("(d) transformers serve")
            results += await bench_transformers_serve(
                args, workload, model_dir, work, stack_levels, limit, notes
            )
    ratios = compute_ratios(results)
    meta = {
        "started": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "config": {
            "max_tokens": workload.max_tokens,
            "quick": quick,
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
