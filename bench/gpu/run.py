"""The GPU check's flow: checkpoint, bandwidth, engine, decode levels, KV layouts, services, requests, paths,
TTFT.

Each phase that fails is recorded in the report (``failures``) and the run goes on where it can; the report
is written whatever happens, also when the whole run hits ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.gpu import report as rep
from bench.gpu.plan import Plan
from bench.loadgen import LevelResult, RequestRecord, closed_loop
from bench.servers import REPO
from bench.workload import Workload

log = logging.getLogger("bench.gpu")
RAW, MODEL_HTTP, API = "raw engine", "model service HTTP", "api -> model service"


class Run:
    """One run's state: the report being filled, the phase in progress, what must be stopped."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        self.args, self.plan = args, plan
        self.report = rep.GpuReport(mode=plan.mode, started=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.phase = "start"
        self.engine: Any = None
        self.services: Any = None
        self.model_id = ""

    async def step(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run one phase; a failure is recorded (``name: error``) and gives None."""
        self.phase = name
        log.info("phase: %s", name)
        try:
            return await work()
        except Exception as exc:
            log.exception("phase %s failed", name)
            self.report.failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            return None

    async def close(self) -> None:
        if self.services is not None:
            await asyncio.to_thread(self.services.stop)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown, 5.0)


async def execute(args: argparse.Namespace, plan: Plan) -> rep.GpuReport:
    """The whole flow within ``args.timeout`` seconds; the report is written to ``args.out`` at the end."""
    run = Run(args, plan)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(_flow(run), timeout=args.timeout)
    except TimeoutError:
        run.report.failures.append(f"timed out after {args.timeout:.0f} s in phase '{run.phase}'")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run.close(), timeout=60.0)
        run.report.duration_s = time.perf_counter() - started
        rep.write(run.report, args.out)
    return run.report


NOTES = (
    "decode levels: N greedy text streams submitted at once to a fresh scheduler (prompt prefill included); "
    "bound = N x bandwidth / decoder bytes (KV-cache reads left out, so it flatters large batches)",
    "paths: the same mixed workload (one request in 3 with a 64x64 PNG) back to back per level; "
    "vs raw = tok/s over the in-process engine's at the same level",
)


async def _flow(run: Run) -> None:
    run.report.notes.extend(NOTES)
    if run.plan.serving:
        settings = ", ".join(f"{name}={value}" for name, value in run.plan.serving)
        run.report.notes.append(f"engine and model service settings: {settings} (the GPU deployments')")
    if run.plan.mode != "cuda":
        run.report.notes.append("CPU dry run: the tiny architecture on CPU; the figures test the flow only")
    model_dir = await run.step("checkpoint", lambda: asyncio.to_thread(_checkpoint, run))
    if model_dir is None:
        return
    run.model_id = str(model_dir)
    await run.step("bandwidth", lambda: _bandwidth(run))
    if await run.step("engine", lambda: _engine(run)) is None:
        return
    await run.step("decode levels", lambda: _decode(run))
    await _kv_layouts(run)
    workloads = (Workload.build(run.plan.path_tokens), _image_workload())
    raw, raw_image = (await run.step("engine start", lambda: _start(run, workloads))) or (None, None)
    if raw is None:
        return
    await run.step("image TTFT in-process", lambda: _ttft(run, RAW, raw_image.send))
    if run.args.skip_stack:
        run.report.notes.append("--skip-stack: the model service and the api were not started")
        await _paths(run, {RAW: raw.send})
        return
    await _with_services(run, raw, workloads)


def _checkpoint(run: Run) -> Path:
    import torch

    from bench.gpu.checkpoint import build_checkpoint, tokenizer_source

    tokenizers = tokenizer_source(REPO, REPO / ".whl" / "data")
    dtype = getattr(torch, run.plan.dtype_name)
    return build_checkpoint(run.args.model_dir, tokenizers, run.plan.arch, run.plan.device, dtype)


async def _bandwidth(run: Run) -> None:
    from bench.gpu.bound import copy_bandwidth

    run.report.bandwidth = await asyncio.to_thread(copy_bandwidth, run.plan.device, run.plan.copy_bytes)


async def _engine(run: Run) -> bool:
    import torch
    import transformers

    from bench.gpu.bound import weight_bytes
    from bench.gpu.engine_side import device_info, load_engine

    p = run.plan
    run.engine = await asyncio.to_thread(
        load_engine, Path(run.model_id), p.device_map, p.torch_threads, dict(p.serving)
    )
    sizes = weight_bytes(run.engine.loaded.model)
    r = run.report
    r.parameters, r.total_bytes, r.decode_bytes = sizes.parameters, sizes.total, sizes.decode
    r.device, r.dtype = device_info(run.engine)
    r.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return True


async def _decode(run: Run) -> None:
    from bench.gpu.engine_side import decode_levels

    p, r = run.plan, run.report
    r.decode = await asyncio.to_thread(
        decode_levels, run.engine, p.decode_batches, p.decode_tokens, r.decode_bytes, r.bandwidth
    )


async def _kv_layouts(run: Run) -> None:
    """``measure_churn`` per row count of the plan, sized by the decode levels' step times to fit the
    phase's budget; each row count a phase of its own (a failure at 64 rows keeps the 16 rows' figures)."""
    from bench.gpu.engine_side import kv_layouts
    from bench.gpu.plan import kv_sizes, step_times

    measured, left_out = kv_sizes(run.plan, step_times(run.report.decode))
    for size in left_out:
        run.report.notes.append(
            f"KV layouts @{size.rows} rows left out: ~{size.estimate_s:.0f} s estimated from the decode "
            f"levels, over the phase's {run.plan.kv_budget_s:.0f} s"
        )
    for size in measured:
        rows = await run.step(
            f"KV layouts @{size.rows}",
            lambda size=size: asyncio.to_thread(kv_layouts, run.engine, size.rows, size.steps, size.runs),
        )
        run.report.kv_layouts.extend(rows or [])


async def _start(run: Run, workloads: tuple[Workload, ...]) -> tuple[Any, ...]:
    from bench.gpu.engine_side import start_clients

    return tuple(start_clients(run.engine, workloads))


def _image_workload() -> Workload:
    """Every request one 1024x1024 noise PNG (1024 visual tokens) and one output token."""
    from tests.model.media import png_bytes

    return Workload(max_tokens=1, image_every=1, png=png_bytes(1024, 1024))


async def _ttft(run: Run, path: str, send: Callable[[int], Awaitable[RequestRecord]]) -> None:
    """Median time to first token of ``ttft_runs`` sequential image requests after one warm-up."""
    await send(0)
    records = [await send(i) for i in range(1, run.plan.ttft_runs + 1)]
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(failed[0])
    times = [(r.first_token or r.end) - r.start for r in records]
    prompt = records[-1].prompt_tokens
    run.report.ttft.append(rep.TtftRow(path, statistics.median(times), len(times), prompt))


async def _with_services(run: Run, raw: Any, workloads: tuple[Workload, ...]) -> None:
    from bench.gpu.model_http import ModelTarget
    from bench.gpu.requests import check_all
    from bench.gpu.services import Services
    from bench.http_client import ChatTarget, make_client

    p = run.plan
    work = run.args.model_dir.parent / "services"
    run.services = Services(
        Path(run.model_id), work, p.device_map, torch_threads=p.torch_threads, serving=p.serving
    )
    if await run.step("model service start", lambda: asyncio.to_thread(_start_model, run)) is None:
        return
    api_up = await run.step("api start", lambda: asyncio.to_thread(_start_api, run)) is not None
    if not api_up:
        run.report.notes.append(
            "the api could not start here: the model service's HTTP stream is compared alone"
        )
    async with make_client(64, timeout=p.level_time_limit + 60) as client:
        api_url = run.services.api_url if api_up else ""
        checks = await run.step(
            "requests",
            lambda: check_all(client, run.services.model_url, api_url, run.model_id, p.path_tokens),
        )
        run.report.media = checks or []
        targets = {RAW: raw.send, MODEL_HTTP: ModelTarget(client, run.services.model_url, workloads[0]).send}
        image = {MODEL_HTTP: ModelTarget(client, run.services.model_url, workloads[1]).send}
        if api_up:
            targets[API] = ChatTarget(client, api_url, run.model_id, workloads[0], include_usage=True).send
            image[API] = ChatTarget(client, api_url, run.model_id, workloads[1], include_usage=True).send
        await _paths(run, targets)
        for path, send in image.items():
            await run.step(f"image TTFT via {path}", lambda send=send, path=path: _ttft(run, path, send))
    run.report.notes.append(
        "no nginx on the GPU machine: the api runs under uvicorn (one process, SQLite sessions), no edge"
    )


def _start_model(run: Run) -> bool:
    run.services.start_model(run.plan.start_timeout)
    return True


def _start_api(run: Run) -> bool:
    run.services.start_api(run.plan.start_timeout)
    return True


async def _paths(run: Run, targets: dict[str, Callable[[int], Awaitable[RequestRecord]]]) -> None:
    """Every path at every level, back to back per level; tok/s relative to the raw engine's."""
    from bench.loadgen import level_sizes, warm_up

    p = run.plan
    for name, send in targets.items():
        await run.step(f"warm-up {name}", lambda send=send: warm_up(send, 4, concurrency=2))
    for concurrency in p.path_levels:
        raw_tok_s = None
        for name, send in targets.items():
            n = level_sizes(concurrency, False, p.level_cap)
            records = await run.step(
                f"{name} @{concurrency}",
                lambda send=send, n=n, c=concurrency: closed_loop(send, c, n, p.level_time_limit),
            )
            if records is None:
                continue
            level = LevelResult.from_records(name, concurrency, records)
            raw_tok_s = level.tok_s if name == RAW else raw_tok_s
            vs_raw = level.tok_s / raw_tok_s if raw_tok_s and name != RAW else None
            run.report.targets.append(
                rep.TargetRow(
                    name, concurrency, level.requests, level.ok, level.tok_s, level.ttft_p50, vs_raw
                )
            )
            for sample in level.error_samples[:2]:
                run.report.failures.append(f"{name} @{concurrency}: {sample}")
