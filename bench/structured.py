"""Constrained decoding cost: the raw engine at 16 streams with half the rows grammar-constrained vs none.

``python -m bench.structured`` (also the last part of ``make bench``). Both runs send the same prompts with
the same reasoning budget (the server closes the thinking after ``REASONING_TOKENS``), greedy, the same
``max_tokens``; in the constrained run every second request also has a ``json_schema`` response format
(enums, booleans, bounded integers and a 40-item array: longer than ``max_tokens``, so every request of both
runs generates exactly ``max_tokens`` tokens and both runs do the same prefills: the difference is the
grammar's cost alone). The figure is generated tokens per second over the whole run (closed loop, 16 in
flight); runs alternate and the best of each kind is kept (other work on a shared machine only slows a run
down). Target: the constrained run reaches at least 0.85 of the unconstrained one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.engine_bench import EngineClient, load_engine
from bench.loadgen import LevelResult, closed_loop, warm_up
from bench.workload import PROMPTS

log = logging.getLogger("bench.structured")

TARGET = 0.85
CONCURRENCY = 16
REASONING_TOKENS = 16
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue", "yellow"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {
            "type": "array",
            "items": {"enum": ["alpha", "beta", "gamma", "delta"]},
            "minItems": 40,
            "maxItems": 40,
        },
        "size": {"type": "object", "properties": {"big": {"type": "boolean"}}, "required": ["big"]},
    },
    "required": ["colour", "ok", "count", "tags", "size"],
}


class StructuredWorkload:
    """Text prompts; with ``constrained`` every second request asks for ``SCHEMA``."""

    def __init__(self, max_tokens: int, constrained: bool) -> None:
        self.max_tokens = max_tokens
        self.constrained = constrained

    def request(self, index: int) -> int:
        return index

    def generate_request(self, index: int, request_id: str) -> Any:
        from services.protocol.generate import GenerateRequest, Message, ResponseFormat, SamplingParams

        fmt = ResponseFormat(type="json_schema", json_schema=SCHEMA)
        sampling = SamplingParams(
            max_tokens=self.max_tokens, temperature=0.0, max_reasoning_tokens=REASONING_TOKENS
        )
        return GenerateRequest(
            request_id=request_id,
            messages=[Message(role="user", content=f"{PROMPTS[index % len(PROMPTS)]} (item {index})")],
            sampling=sampling,
            response_format=fmt if self.constrained and index % 2 else None,
        )


async def measure(model_dir: Path, requests: int, max_tokens: int, repeats: int) -> dict[str, Any]:
    """Alternating unconstrained / half-constrained runs; the best tok/s of each and their ratio."""
    engine = await asyncio.to_thread(load_engine, model_dir, None)
    loop = asyncio.get_running_loop()
    clients = {
        kind: EngineClient(engine, StructuredWorkload(max_tokens, kind == "half"), loop)  # type: ignore[arg-type]
        for kind in ("none", "half")
    }
    engine.start(lambda outputs: [c.sink(outputs) for c in clients.values()])
    runs: dict[str, list[LevelResult]] = {"none": [], "half": []}
    try:
        for client in clients.values():
            await warm_up(client.send, 4, concurrency=4)
        for _ in range(repeats):
            for kind, client in clients.items():
                records = await closed_loop(client.send, CONCURRENCY, requests, 600.0)
                result = LevelResult.from_records(kind, CONCURRENCY, records)
                assert result.errors == 0, [r.error for r in records if r.error][:3]
                runs[kind].append(result)
                log.info("%s @%d: %.1f tok/s", kind, CONCURRENCY, result.tok_s)
    finally:
        await asyncio.to_thread(engine.shutdown, 5.0)
    best = {kind: max(r.tok_s for r in rs) for kind, rs in runs.items()}
    return {
        "concurrency": CONCURRENCY,
        "requests": requests,
        "max_tokens": max_tokens,
        "reasoning_tokens": REASONING_TOKENS,
        "tok_s_none": round(best["none"], 1),
        "tok_s_half_constrained": round(best["half"], 1),
        "ratio": round(best["half"] / best["none"], 3) if best["none"] else 0.0,
        "target": TARGET,
        "runs": {kind: [round(r.tok_s, 1) for r in rs] for kind, rs in runs.items()},
    }


def report(result: dict[str, Any]) -> str:
    verdict = "ok" if result["ratio"] >= TARGET else "MISS"
    return (
        f"structured outputs @{result['concurrency']} (raw engine): none {result['tok_s_none']} tok/s | "
        f"half constrained {result['tok_s_half_constrained']} tok/s | ratio {result['ratio']} "
        f"(target >= {TARGET}: {verdict})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    from bench.servers import REPO

    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__)
    p.add_argument("--model-dir", type=Path, default=REPO / ".cache" / "tiny-qwen3-vl")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from services.model.tiny_checkpoint import ensure_tiny_checkpoint

    model_dir = ensure_tiny_checkpoint(args.model_dir)
    result = asyncio.run(measure(model_dir, args.requests, args.max_tokens, args.repeats))
    print(report(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
