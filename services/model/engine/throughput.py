"""In-process throughput of the batching scheduler: the reference the HTTP-stack benchmark compares with.

``python -m services.model.engine.throughput --model .cache/tiny-qwen3-vl --streams 1 16`` prints one JSON
line per stream count: ``{"streams", "tokens", "seconds", "tokens_per_second"}``. Each stream is one greedy
text request of ``--max-tokens`` tokens, all submitted at once to a fresh scheduler running in its own
thread, exactly as the model service runs it (minus HTTP, JSON and the event loop). All streams share one
batch unless ``--max-batch-size N`` caps it (the rest queue, as in the service with ``MAX_BATCH_SIZE``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from services.model.engine.base import FinalOutput, Output
from services.model.engine.scheduler import Scheduler
from services.protocol.generate import GenerateRequest, Message, SamplingParams


@dataclass(frozen=True, slots=True)
class Throughput:
    streams: int
    tokens: int
    seconds: float
    tokens_per_second: float


class _Counter:
    """Sink that counts finished requests and their tokens."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.finished = 0
        self.tokens = 0

    def __call__(self, outputs: Sequence[tuple[str, Output]]) -> None:
        with self.cond:
            for _, out in outputs:
                if isinstance(out, FinalOutput):
                    self.finished += 1
                    self.tokens += out.completion_tokens
            self.cond.notify_all()


def story_requests(engine: Any, streams: int, max_tokens: int, id_prefix: str, stagger: int = 0) -> list[Any]:
    """``streams`` greedy text requests prepared by ``engine`` (ids ``{id_prefix}-{i}``); request i asks for
    ``max_tokens - (i % 4) * stagger`` tokens (``stagger`` > 0: rows leave at different steps)."""
    return [
        engine.prepare_sync(
            GenerateRequest(
                request_id=f"{id_prefix}-{i}",
                messages=[Message(role="user", content=f"Write story number {i} about a lighthouse.")],
                sampling=SamplingParams(max_tokens=max_tokens - (i % 4) * stagger, temperature=0.0),
            )
        )
        for i in range(streams)
    ]


def measure(
    engine: Any, streams: int, max_tokens: int = 128, timeout: float = 600.0, max_batch_size: int = 0
) -> Throughput:
    """Run ``streams`` concurrent greedy requests through a fresh scheduler over ``engine``'s model.

    ``max_batch_size`` 0: all streams run in one batch (at least the engine's own size); otherwise the
    batch holds at most that many and the rest queue, as in the service (MAX_BATCH_SIZE)."""
    batch = max_batch_size or max(streams, engine.scheduler_config.max_batch_size)
    config = replace(engine.scheduler_config, max_batch_size=batch)
    config = replace(config, max_queue=max(config.max_queue, streams))
    prepared = story_requests(engine, streams, max_tokens, f"bench-{streams}")
    counter = _Counter()
    scheduler = Scheduler(engine.loaded.model, engine.table, config)
    scheduler.start(counter)
    try:
        started = time.perf_counter()
        for p in prepared:
            scheduler.submit(p)
        with counter.cond:
            if not counter.cond.wait_for(lambda: counter.finished == streams, timeout):
                raise TimeoutError(f"{streams} streams did not finish in {timeout}s")
        seconds = time.perf_counter() - started
    finally:
        scheduler.shutdown(0)
    return Throughput(streams, counter.tokens, round(seconds, 4), round(counter.tokens / seconds, 1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint directory or hub id")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=0,
        help="most rows in the batch, the rest queue (0: every stream in one batch)",
    )
    args = parser.parse_args(argv)

    import torch

    from services.model.engine.hf import HFEngine
    from services.model.loading import load_model_and_processor
    from services.model.settings import ModelSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = ModelSettings(model_repo_id=args.model)
    engine = HFEngine(load_model_and_processor(settings), settings)
    measure(engine, 2, 8)  # warm-up
    for streams in args.streams:
        result = measure(engine, streams, args.max_tokens, max_batch_size=args.max_batch_size)
        print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
