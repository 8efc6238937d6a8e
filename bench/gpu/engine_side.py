"""The in-process side of the GPU check: the engine as the service builds it, decode levels, bandwidth."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.engine_bench import EngineClient
from bench.gpu.bound import decode_bound
from bench.gpu.report import DecodeRow, KvLayoutRow


def load_engine(
    model_dir: Path, device_map: str, torch_threads: int, serving: Mapping[str, str] | None = None
) -> Any:
    """An ``HFEngine`` over ``model_dir`` with the service's default settings (dtype auto: bf16 on CUDA)
    but ``serving``'s (environment names, e.g. ``{"KV_LAYOUT": "slots"}``: what the deployments set)."""
    from services.model.engine.hf import HFEngine
    from services.model.loading import load_model_and_processor
    from services.model.settings import ModelSettings

    overrides = {name.lower(): value for name, value in (serving or {}).items()}
    settings = ModelSettings(
        model_repo_id=str(model_dir), device_map=device_map, torch_threads=torch_threads, **overrides
    )
    return HFEngine(load_model_and_processor(settings), settings)


def decode_levels(
    engine: Any,
    batches: Sequence[int],
    max_tokens: int,
    decode_bytes: int,
    bandwidth: float | None,
) -> list[DecodeRow]:
    """``batches[i]`` greedy text streams in one batch each (a fresh scheduler, the engine's model), after
    a short warm-up; each row with its bound when the bandwidth is known. The engine must not be started."""
    from services.model.engine.throughput import measure

    measure(engine, 2, 4)  # warm-up: kernels, allocator, the sampler's buffers
    rows = []
    for batch in batches:
        result = measure(engine, batch, max_tokens)
        bound = decode_bound(decode_bytes, bandwidth, batch) if bandwidth else None
        rows.append(DecodeRow(batch, result.tokens, result.seconds, bound))
    return rows


def kv_layouts(engine: Any, rows: int, steps: int, runs: int) -> list[KvLayoutRow]:
    """Every KV layout (``bench.kv_bench.LAYOUTS``, and on CUDA ``GRAPHED``) at ``rows`` rows on the
    engine's model: steady vs join-heavy ms per step (``measure_churn``, CUDA synchronised before each clock
    read). The engine must not be started (its scheduler would share the model). The batches' memory is
    handed back to the device afterwards, also when a run fails (out of memory at 64 rows must not starve
    the phases after it)."""
    import gc

    import torch

    from bench.kv_bench import GRAPHED, LAYOUTS, SETTINGS, measure_churn

    loaded = engine.loaded
    layouts = (*LAYOUTS, GRAPHED) if loaded.device.type == "cuda" else LAYOUTS
    try:
        measured = measure_churn(
            loaded.model, loaded.processor, steps=steps, repeats=runs, rows=rows, layouts=layouts
        )
    finally:
        gc.collect()
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
    return [
        KvLayoutRow(
            m["layout"],
            SETTINGS[m["layout"]],
            rows,
            steps,
            runs,
            m["churn_every"],
            m["steady_ms"],
            m["join_heavy_ms"],
        )
        for m in measured
    ]


def start_clients(engine: Any, workloads: Sequence[Any]) -> list[EngineClient]:
    """Start ``engine`` with one ``EngineClient`` per workload sharing its sink (each keeps its own ids)."""
    loop = asyncio.get_running_loop()
    clients = [EngineClient(engine, w, loop) for w in workloads]

    def sink(outputs: Sequence[tuple[str, Any]]) -> None:
        for client in clients:
            client.sink(outputs)

    engine.start(sink)
    return clients


def device_info(engine: Any) -> tuple[str, str]:
    """(device name, dtype) of the engine's model."""
    import torch

    device = engine.loaded.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return name, str(engine.loaded.dtype).removeprefix("torch.")
