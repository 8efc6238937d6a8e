"""(g) and (h) of ``make bench``: the KV cache while rows come and go, and what the prefix cache saves.

(g) mean time per step at 16 rows, steady (nobody joins or leaves) vs join-heavy (every few steps one row
leaves and a freshly prefilled one joins), for each KV layout (``concat``, ``slots``, ``slots`` with
``KV_STATIC_SHAPES``), on the engine's batch functions (``services.model.engine.batch``) and the tiny
checkpoint, driven as the scheduler drives them: a leave is ``select``, a join ``merge`` of the running batch
with the newcomer's one-row prefill state (``KV_LAYOUT=slots``: into a free slot), a decode step writes its
logits into one reused buffer. The timed part of a churn step is the leave, the join and the decode step; the
joining row's own prefill is done before the clock starts (it costs the same whatever the cache layout). On
CUDA each clock read first waits for the model's kernels (``make gpu-check`` runs the same measure).
(h) time to first token of turn 2 of a chat about one 1024x1024 image vs turn 1, on the in-process
``HFEngine`` with its prefix cache: engine-only (submit to first token) and end to end (request
preparation included: turn 1 decodes, processes and hashes the image; turn 2 finds it in the media cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHURN_ROWS = 16
CHURN_EVERY = 4
WARMUP_STEPS = 10  # per layout, one leave + one join every 2 steps, before any timed run
TURN_IMAGE_SIDE = 1024
_PROMPTS = (
    "Tell me a story about a lighthouse keeper.",
    "List the planets of the solar system in order.",
    "Why is the sky blue? Explain briefly.",
    "Write a haiku about autumn rain on a tin roof.",
)


@dataclass(frozen=True, slots=True)
class KvLayout:
    """One KV layout as the scheduler runs it: ``name`` (the rows' ``layout`` key), the settings that select
    it, whether it keeps row slots (``KV_LAYOUT=slots``), whether slots decode with static shapes and whether
    that decode is replayed from CUDA graphs (``CUDA_GRAPHS``: CUDA only)."""

    name: str
    setting: str
    slots: bool
    static: bool = False
    graphs: bool = False


LAYOUTS = (
    KvLayout("concat", "KV_LAYOUT=concat", slots=False),
    KvLayout("slots", "KV_LAYOUT=slots", slots=True),
    KvLayout("slots-static", "KV_LAYOUT=slots + KV_STATIC_SHAPES=true", slots=True, static=True),
)
# measured on CUDA only (the GPU check): on CPU the scheduler refuses CUDA_GRAPHS
GRAPHED = KvLayout(
    "slots-static-graphs",
    "KV_LAYOUT=slots + KV_STATIC_SHAPES=true + CUDA_GRAPHS=true",
    slots=True,
    static=True,
    graphs=True,
)
SETTINGS = {layout.name: layout.setting for layout in (*LAYOUTS, GRAPHED)}


def _prefill_text(model: Any, processor: Any, text: str) -> Any:
    """One text prompt prefilled alone: its one-row batch state."""
    from services.model.engine import batch as kv

    ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    return kv.prefill(model, {"input_ids": ids}, next(model.parameters()).device)[1]


def _slots(layout: KvLayout, rows: int) -> Any:
    """The ``SlotConfig`` the scheduler builds for ``layout`` with ``MAX_BATCH_SIZE`` = ``rows`` and no KV
    budget (None: concat)."""
    from services.model.engine.kv_slots import SlotConfig

    return SlotConfig(rows, static=layout.static, graphs=layout.graphs) if layout.slots else None


def _cuda_devices(model: Any) -> tuple[Any, ...]:
    """The CUDA devices holding ``model``'s parameters (empty on CPU): the clock waits for their kernels."""
    return tuple(sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str))


def _clock(devices: tuple[Any, ...]) -> float:
    """``time.perf_counter()`` once the kernels queued on ``devices`` have finished (CUDA runs them
    asynchronously: without this the clock would time their launch, not their work)."""
    if devices:
        import torch

        for device in devices:
            torch.cuda.synchronize(device)
    return time.perf_counter()


def _start_batch(starts: list[Any], slots: Any) -> Any:
    """A running batch of copies of the prefilled ``starts`` (they stay untouched for the next run)."""
    from services.model.engine import batch as kv

    return kv.merge([kv.take(state, [0]) for state in starts], slots)


def _run(
    model: Any,
    batch: Any,
    steps: int,
    churn_every: int,
    joiners: list[Any],
    slots: Any,
    devices: tuple[Any, ...] = (),
) -> tuple[float, float]:
    """Mean seconds per step of ``steps`` decode steps and of the leaves + joins amortised over all steps;
    with ``churn_every`` > 0 every ``churn_every``-th step first drops one row (rotating) and merges in a copy
    of a prefilled joiner (the copy is made off the clock). ``slots``: the layout's ``SlotConfig`` (None:
    concat); ``devices``: CUDA devices to synchronise before each clock read (:func:`_cuda_devices`)."""
    from services.model.engine import batch as kv

    logits = kv.LogitsBuffer(model)
    decoding = churning = 0.0
    for step in range(steps):
        if churn_every > 0 and step % churn_every == churn_every - 1:
            joiner = kv.take(joiners[step % len(joiners)], [0])
            started = _clock(devices)
            leave = step % batch.size
            batch = kv.select(batch, [i for i in range(batch.size) if i != leave])
            batch = kv.merge([batch, joiner], slots)
            churning += _clock(devices) - started
        started = _clock(devices)
        kv.decode(model, batch, out=logits.rows(batch.size))
        decoding += _clock(devices) - started
    return decoding / steps, churning / steps


def measure_churn(
    model: Any,
    processor: Any,
    steps: int = 200,
    churn_every: int = CHURN_EVERY,
    repeats: int = 3,
    rows: int = CHURN_ROWS,
    layouts: tuple[KvLayout, ...] = LAYOUTS,
) -> list[dict[str, Any]]:
    """(g) Mean ms per step at ``rows`` rows for each of ``layouts``: steady decode vs decode plus one leave
    + one join every ``churn_every`` steps (amortised); each figure the best (lowest) of ``repeats`` runs,
    the kinds of run interleaved. On CUDA every clock read waits for the model's kernels. The starting rows
    and the joiners are prefilled once (off the clock); each run decodes copies of them."""
    import torch

    best: dict[tuple[str, int], tuple[float, float]] = {}
    devices = _cuda_devices(model)
    with torch.inference_mode():
        prefilled: dict[str, Any] = {}
        for text in dict.fromkeys([*_start_prompts(rows), *_PROMPTS]):
            prefilled[text] = _prefill_text(model, processor, text)
        starts = [prefilled[text] for text in _start_prompts(rows)]
        joiners = [prefilled[text] for text in _PROMPTS]
        for layout in layouts:  # warm-up
            slots = _slots(layout, rows)
            _run(model, _start_batch(starts, slots), WARMUP_STEPS, 2, joiners, slots, devices)
        for _ in range(repeats):
            for layout in layouts:
                slots = _slots(layout, rows)
                for every in (0, churn_every):
                    batch = _start_batch(starts, slots)
                    dec, joins = _run(model, batch, steps, every, joiners, slots, devices)
                    key = (layout.name, every)
                    if key not in best or dec + joins < sum(best[key]):
                        best[key] = (dec, joins)
    return [
        _churn_row(x.name, rows, best[x.name, 0], best[x.name, churn_every], steps, churn_every)
        for x in layouts
    ]


def _start_prompts(rows: int) -> list[str]:
    """The ``rows`` prompts of the starting batch (12 distinct ones, of three lengths, repeated)."""
    return [_PROMPTS[i % len(_PROMPTS)] * (1 + i % 3) for i in range(rows)]


def _churn_row(
    layout: str,
    rows: int,
    steady: tuple[float, float],
    churn: tuple[float, float],
    steps: int,
    every: int,
) -> dict[str, Any]:
    return {
        "layout": layout,
        "rows": rows,
        "steps": steps,
        "churn_every": every,
        "steady_ms": round(steady[0] * 1000, 3),
        "join_heavy_ms": round(sum(churn) * 1000, 3),
        "join_heavy_decode_ms": round(churn[0] * 1000, 3),
        "ratio": round(sum(churn) / steady[0], 3),
    }


def _turn_request(request_id: str, image_b64: str, history: list[tuple[str, str]], question: str) -> Any:
    from services.protocol.generate import GenerateRequest, ImagePart, Message, SamplingParams, TextPart

    first = [ImagePart(data=image_b64), TextPart(text=history[0][0] if history else question)]
    messages = [Message(role="user", content=first)]
    for i, (_, answer) in enumerate(history):
        messages.append(Message(role="assistant", content=answer))
        asked = history[i + 1][0] if i + 1 < len(history) else question
        messages.append(Message(role="user", content=asked))
    return GenerateRequest(
        request_id=request_id, messages=messages, sampling=SamplingParams(max_tokens=4, temperature=0.0)
    )


def _timed_turn(engine: Any, sink: Any, request: Any) -> dict[str, float]:
    """Prepare and submit one request; seconds to its first output (end to end and from submit)."""
    started = time.monotonic()
    prepared = engine.prepare_sync(request)
    submitted = time.monotonic()
    engine.submit(prepared)
    rid = request.request_id
    sink.wait(lambda: rid in sink.finished)
    first = sink.times[rid][0]
    return {
        "engine_s": first - submitted,
        "end_to_end_s": first - started,
        "prompt_tokens": prepared.prompt_tokens,
        "cached_tokens": sink.finished[rid].cached_tokens,
    }


def measure_turns(engine: Any, repeats: int = 3, side: int = TURN_IMAGE_SIDE) -> dict[str, Any]:
    """(h) TTFT of turn 2 vs turn 1 of a chat about one ``side`` x ``side`` image (a new image each repeat,
    so turn 1 always misses); the best (lowest) of ``repeats`` for each figure. ``engine``: an HFEngine
    (not started; shut down here)."""
    from tests.model.image_stall import TimedSink, big_image_b64

    sink = TimedSink()
    engine.start(sink)
    runs: list[tuple[dict[str, float], dict[str, float]]] = []
    try:
        warm = _turn_request("warm", big_image_b64(64), [], "Hi")
        _timed_turn(engine, sink, warm)
        for r in range(repeats):
            image = big_image_b64(side - r)  # a different image (and digest) each repeat
            one = _timed_turn(engine, sink, _turn_request(f"t1-{r}", image, [], "What is in this picture?"))
            history = [("What is in this picture?", "A smooth colour gradient.")]
            two = _timed_turn(engine, sink, _turn_request(f"t2-{r}", image, history, "Which colours?"))
            runs.append((one, two))
    finally:
        engine.shutdown(5.0)
    return _turn_summary(runs, side)


def _turn_summary(runs: list[tuple[dict[str, float], dict[str, float]]], side: int) -> dict[str, Any]:
    def best(turn: int, key: str) -> float:
        return min(run[turn][key] for run in runs)

    out: dict[str, Any] = {"image_side": side, "repeats": len(runs)}
    for key in ("engine_s", "end_to_end_s"):
        out[f"turn1_{key}"] = round(best(0, key), 4)
        out[f"turn2_{key}"] = round(best(1, key), 4)
        out[f"ratio_{key.removesuffix('_s')}"] = round(best(1, key) / best(0, key), 3)
    out["turn2_prompt_tokens"] = int(runs[-1][1]["prompt_tokens"])
    out["turn2_cached_tokens"] = int(runs[-1][1]["cached_tokens"])
    return out


def kv_table(churn: list[dict[str, Any]], turns: dict[str, Any]) -> str:
    """(g) (one row per KV layout) and (h) as one markdown table, with the targets."""
    rows = [
        "(g) KV cache while rows join and leave, (h) prefix cache across chat turns "
        "(in-process, tiny checkpoint)",
        "| measure | baseline | with churn / turn 2 | ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    for c in churn:
        setting = SETTINGS.get(c["layout"], c["layout"])
        rows.append(
            f"| (g) {setting}: mean ms/step @{c['rows']} rows, 1 leave + 1 join every "
            f"{c['churn_every']} steps | {c['steady_ms']:.3f} (steady) | {c['join_heavy_ms']:.3f} "
            f"(decode {c['join_heavy_decode_ms']:.3f}) | {c['ratio']:.2f} | ~1.0 |"
        )
    rows += [
        f"| (h) TTFT s, engine only, {turns['image_side']}px image, turn 1 vs turn 2 | "
        f"{turns['turn1_engine_s']:.3f} | "
        f"{turns['turn2_engine_s']:.3f} | {turns['ratio_engine']:.2f} | <= 0.30 |",
        "| (h) TTFT s, end to end (prepare included; turn 2 hits the media cache) | "
        f"{turns['turn1_end_to_end_s']:.3f} | "
        f"{turns['turn2_end_to_end_s']:.3f} | {turns['ratio_end_to_end']:.2f} | <= 0.30 |",
    ]
    notes = [
        f"turn 2: {turns['turn2_cached_tokens']} of {turns['turn2_prompt_tokens']} prompt tokens "
        "from the prefix cache"
    ]
    concat = next((c["join_heavy_ms"] for c in churn if c["layout"] == "concat"), None)
    for c in churn:
        if concat and c["layout"] != "concat":
            notes.append(f"(g) join-heavy, {c['layout']} / concat: {c['join_heavy_ms'] / concat:.2f}")
    return "\n".join(rows + notes) + "\n"


def run_kv(model_dir: Path, quick: bool = False, loader: Callable[..., Any] | None = None) -> dict[str, Any]:
    """(g) and (h) on the tiny checkpoint at ``model_dir``; returns both figures' dicts."""
    from services.model.engine.hf import HFEngine
    from tests.model.engine_support import load_tiny

    loaded, settings = (loader or load_tiny)(model_dir)
    churn = measure_churn(
        loaded.model, loaded.processor, steps=60 if quick else 200, repeats=1 if quick else 3
    )
    turns = measure_turns(HFEngine(loaded, settings), repeats=1 if quick else 3)
    return {"churn": churn, "turns": turns}
