"""``python -m bench.gpu.probe``: where a decode step's time goes on a GPU machine (a diagnostic).

The GPU check measured the 2B decode at ~1% of the weight-read bound; this probe separates the causes in one
short run: the cost of one kernel launch, one host synchronisation and one new device allocation; the bare
transformers decode loop (no scheduler) with and without a CUDA graph of a step-shaped forward; and a profile
of the bare loop and of our scheduler's step (top operators by host time). ``--mode graphs`` instead runs
our scheduler over each KV layout (``concat``, ``slots``, ``slots`` + ``KV_STATIC_SHAPES``, and that +
``CUDA_GRAPHS``) with rows leaving at staggered steps, says whether CUDA graphs changed any row's greedy text,
and repeats the dynamic layouts with cuDNN's attention off. Each part is bounded and a part that fails
prints its error and the run goes on. Prints plain text; ``--cpu`` runs the parts that need no CUDA with
the tiny architecture (to test the script). Its findings on the lent H200 are in bench/results/README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.servers import REPO


def _part(name: str, work: Callable[[], None]) -> None:
    print(f"\n=== {name}", flush=True)
    started = time.perf_counter()
    try:
        work()
    except Exception:
        traceback.print_exc()
    print(f"--- {name}: {time.perf_counter() - started:.1f} s", flush=True)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def python_loop() -> None:
    """A pure-Python loop: how fast this machine's CPU runs the interpreter (compare with other machines)."""
    started = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i & 7
    print(f"python loop: {(time.perf_counter() - started) * 1e3:.0f} ms for 2e6 iterations")


def micro(device: Any) -> None:
    """Microseconds per kernel launch, per launch + host sync, per new device allocation."""
    import torch

    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    _sync(device)
    n = 3000
    started = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    _sync(device)
    print(f"launch: {(time.perf_counter() - started) / n * 1e6:.1f} us per x.add_(1) (queued, one sync)")
    n = 300
    started = time.perf_counter()
    for _ in range(n):
        x.add_(1)
        x.item()
    print(f"launch + sync: {(time.perf_counter() - started) / n * 1e6:.1f} us per x.add_(1); x.item()")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        kept = []
        n = 40
        started = time.perf_counter()
        for i in range(n):
            kept.append(torch.empty((3 << 20) + i * (2 << 20), dtype=torch.uint8, device=device))
        _sync(device)
        print(f"new allocation: {(time.perf_counter() - started) / n * 1e6:.1f} us per cudaMalloc (>=3 MB)")
        del kept
        torch.cuda.empty_cache()


def _prompt(model: Any, batch: int, length: int = 16) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(1000, 20000, (batch, length), generator=g).to(model.device)


def bare_loop(model: Any, batch: int, steps: int) -> float:
    """ms per step of ``model(next_token, cache)`` (DynamicCache, greedy), after 3 warm-up steps."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=_prompt(model, batch), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for i in range(steps + 3):
            if i == 3:
                _sync(model.device)
                started = time.perf_counter()
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _sync(model.device)
    return (time.perf_counter() - started) / steps * 1e3


def text_forward(model: Any, batch: int) -> tuple[Callable[[], Any], Any]:
    """A step-shaped forward without a cache: the text decoder and the head over one embedded token per
    row (the same kernels as a decode step, minus the KV cache's). Returns (call, static input)."""
    import torch

    lm = model.model.language_model
    emb = lm.embed_tokens(_prompt(model, batch, 1)).detach().clone()
    position_ids = torch.zeros((3, batch, 1), dtype=torch.long, device=model.device)

    def call() -> Any:
        hidden = lm(inputs_embeds=emb, position_ids=position_ids, use_cache=False).last_hidden_state
        return model.lm_head(hidden)

    return call, emb


def graph_vs_eager(model: Any, batch: int, steps: int) -> None:
    """ms per step-shaped forward: eager vs replayed from a CUDA graph (torch.cuda.CUDAGraph)."""
    import torch

    with torch.inference_mode():
        call, _ = text_forward(model, batch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        _sync(model.device)
        started = time.perf_counter()
        for _ in range(steps):
            call()
        _sync(model.device)
        eager = (time.perf_counter() - started) / steps * 1e3
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        _sync(model.device)
        started = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        _sync(model.device)
        replay = (time.perf_counter() - started) / steps * 1e3
    print(f"batch {batch}: eager {eager:.2f} ms, graph replay {replay:.2f} ms ({eager / replay:.1f}x)")


def profile(label: str, device: Any, work: Callable[[], Any], rows: int = 18) -> None:
    """Top operators by self host time (and device time where CUDA is profiled) over ``work()``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with torch_profile(activities=activities) as prof:
        work()
        _sync(device)
    print(f"[{label}]")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


class _Texts:
    """Sink keeping each request's text and counting finished requests."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.finished = 0

    def __call__(self, outputs: Any) -> None:
        from services.model.engine.base import FinalOutput, TokenOutput

        for request_id, out in outputs:
            if isinstance(out, TokenOutput):
                self.texts[request_id] = self.texts.get(request_id, "") + out.reasoning + out.content
            elif isinstance(out, FinalOutput):
                self.finished += 1


def engine_in_thread(
    engine: Any, streams: int, max_tokens: int, stagger: int = 0, **config: Any
) -> tuple[int, float, dict[str, str]]:
    """Our scheduler driven step by step in this thread (``Scheduler.bind`` + ``step_once``) over
    ``streams`` greedy text requests (request i asks for ``max_tokens - (i % 4) * stagger`` tokens, so rows
    leave at different steps), with ``config`` overriding the engine's SchedulerConfig:
    (steps, ms per step, text per request id)."""
    from dataclasses import replace

    from services.model.engine.scheduler import Scheduler
    from services.model.engine.throughput import story_requests

    base = replace(engine.scheduler_config, max_batch_size=max(streams, 16), max_queue=max(streams, 64))
    sink = _Texts()
    scheduler = Scheduler(engine.loaded.model, engine.table, replace(base, **config))
    scheduler.bind(sink)
    for prepared in story_requests(engine, streams, max_tokens, "probe", stagger):
        scheduler.submit(prepared)
    steps = 0
    started = time.perf_counter()
    while sink.finished < streams and scheduler.step_once():
        steps += 1
    return steps, (time.perf_counter() - started) / max(steps, 1) * 1e3, sink.texts


LAYOUTS = {
    "concat": {"kv_layout": "concat"},
    "slots": {"kv_layout": "slots"},
    "slots-static": {"kv_layout": "slots", "kv_static_shapes": True},
    "slots-static-graphs": {"kv_layout": "slots", "kv_static_shapes": True, "cuda_graphs": True},
}


def graphs(engine: Any, batch: int, max_tokens: int, names: Any = tuple(LAYOUTS)) -> None:
    """ms per step of each layout of ``names``, rows leaving at staggered steps (max_tokens past a column
    block, so graphs are captured again), and whether CUDA_GRAPHS changed any row's greedy text."""
    texts = {}
    for name in names:
        config = LAYOUTS[name]
        steps, ms, texts[name] = engine_in_thread(engine, batch, max_tokens, max_tokens // 8, **config)
        print(f"@{batch} {name}: {steps} steps, {ms:.2f} ms/step", flush=True)
    if "slots-static" in texts and "slots-static-graphs" in texts:
        plain, graphed = texts["slots-static"], texts["slots-static-graphs"]
        same = sum(plain[k] == graphed.get(k) for k in plain)
        print(f"@{batch} graphs vs none: {same}/{len(plain)} rows with the same greedy text", flush=True)


def graphs_mode(engine: Any, max_tokens: int) -> None:
    """The CUDA graph check: each layout at 16 and 1 rows, then with cuDNN's attention off (every new
    shape builds a cuDNN plan: what dynamic shapes pay), then 64 rows."""
    import torch

    static = ("slots-static", "slots-static-graphs")
    engine_in_thread(engine, 2, 4)  # warm-up
    _part("graphs @16", lambda: graphs(engine, 16, max_tokens))
    _part("graphs @1", lambda: graphs(engine, 1, max_tokens, static))
    if engine.loaded.device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        dynamic = ("concat", "slots", "slots-static")
        _part("cudnn sdp off @16", lambda: graphs(engine, 16, max_tokens, dynamic))
        torch.backends.cuda.enable_cudnn_sdp(True)
    _part("graphs @64", lambda: graphs(engine, 64, max_tokens, static))


def _print_steps(steps: int, ms: float, _texts: Any) -> None:
    print(f"{steps} steps, {ms:.2f} ms/step")


def run(model_dir: Path, device_map: str, steps: int, mode: str = "all") -> None:
    """Load the engine over ``model_dir`` on ``device_map`` and print every part (``mode`` "all") or the
    CUDA graph check (``mode`` "graphs"); ``steps``: decode steps per timed loop (tokens per request)."""
    import torch

    from bench.gpu.engine_side import load_engine
    from services.model.engine.throughput import measure

    engine = load_engine(model_dir, device_map, 0)
    model = engine.loaded.model
    device = engine.loaded.device
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    print(f"model on {device}, {engine.loaded.dtype}; torch {torch.__version__}; threads {threads}")
    if mode == "graphs":
        graphs_mode(engine, steps)
        return
    _part("python", python_loop)
    _part("micro", lambda: micro(device))
    for batch in (1, 16):
        _part(f"bare loop @{batch}", lambda b=batch: print(f"{bare_loop(model, b, steps):.2f} ms/step"))
    if cuda:
        for batch in (1, 16):
            _part(f"graph @{batch}", lambda b=batch: graph_vs_eager(model, b, steps))
    _part("profile bare loop @1", lambda: profile("bare @1", device, lambda: bare_loop(model, 1, 8)))
    measure(engine, 1, 4)
    _part("engine @1", lambda: print(measure(engine, 1, steps)))
    for batch in (1, 16):
        _part(f"engine in thread @{batch}", lambda b=batch: _print_steps(*engine_in_thread(engine, b, steps)))
    _part("profile engine @1", lambda: profile("engine @1", device, lambda: engine_in_thread(engine, 1, 8)))
    _part("engine @16", lambda: print(measure(engine, 16, steps)))


def main() -> None:
    """The command line: build (or reuse) the random checkpoint at ``--model-dir``, then :func:`run`."""
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "tmp" / "gpu-check" / "model")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--cpu", action="store_true", help="tiny checkpoint on CPU (tests this script)")
    parser.add_argument(
        "--mode", choices=("all", "graphs"), default="all", help="all parts, or the CUDA graph check"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.gpu.checkpoint import architecture, build_checkpoint, tokenizer_source

    arch = architecture(tiny=args.cpu)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    device = "cpu" if args.cpu else "cuda"
    tokenizer = tokenizer_source(REPO, REPO / ".whl" / "data")
    model_dir = build_checkpoint(args.model_dir, tokenizer, arch, device, dtype)
    run(model_dir, device, args.steps, args.mode)


if __name__ == "__main__":
    main()
