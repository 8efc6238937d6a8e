"""The small Engine protocol that the internal HTTP API talks to.

Whatever runs the model (the HF step-level batching scheduler, or the deterministic fake for fast tests)
implements this. The engine never sees HTTP; the routes never see tensors.

Threading: ``admit`` is awaited on the event loop; it counts the request at once (the one admission rule,
``engine/admission.py``), does its CPU work (media decoding, chat template, processor) off the loop and
queues it. ``cancel``/``stats`` are cheap and thread-safe. The engine's own thread drives the model and
reports outputs through the ``OutputSink`` given at ``start``, once per scheduler step with every row's
output of that step (one hop to the event loop per step, not per token), and its metrics through the
``EngineObserver`` it was built with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.protocol.generate import GenerateRequest, SamplingParams

Candidate = tuple[str, float, bytes | None]
"""A token's text (special tokens by name), its log-probability and its bytes (None: a special token)."""
LogprobEntry = tuple[str, float, bytes | None, tuple[Candidate, ...]]
"""A generated token as a ``Candidate`` followed by its distribution's top candidates, most likely first."""


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob entries of the tokens a ``TokenOutput`` covers: generated while reasoning (``</think>``
    included), then in the answer."""

    reasoning: list[LogprobEntry]
    content: list[LogprobEntry]


@dataclass(slots=True)
class TokenOutput:
    """Text produced for one request in one step (either field may be empty, e.g. a held-back partial
    UTF-8 character or a possible stop-string prefix). ``tokens`` counts generated tokens it covers;
    ``logprobs`` (requests with ``top_logprobs`` set only) has one entry for each of them. ``index`` is
    the choice (0..n-1); with ``n`` > 1 a choice's last output carries its ``finish_reason`` (the
    request's one ``FinalOutput`` follows once every choice ended; see ``choices.ChoiceGroup``)."""

    reasoning: str
    content: str
    tokens: int
    logprobs: TokenLogprobs | None = None
    index: int = 0
    finish_reason: str | None = None


@dataclass(slots=True)
class FinalOutput:
    """The last output of a request: always exactly one per submitted request (whatever its ``n``;
    ``completion_tokens`` then counts every choice's tokens)."""

    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # with an ``error``: "internal" (ours), or "invalid_schema" (the output reached a part of the request's
    # JSON schema that no value satisfies; ``error`` starts with the parameter's path and ": ", as
    # ``protocol.errors.InvalidSchema`` does)
    error_code: str = "internal"


Output = TokenOutput | FinalOutput
OutputSink = Callable[[Sequence[tuple[str, Output]]], None]
"""Called from the engine thread with ``[(request_id, output), ...]`` for one step."""


@dataclass(slots=True)
class Prepared:
    """A validated request, ready for the scheduler: tokenized prompt, media tensors, resolved sampling."""

    request_id: str
    sampling: SamplingParams  # defaults resolved: max_tokens, temperature, top_p, top_k set
    prompt_tokens: int
    inputs: Any = None  # engine-specific (processor output for hf, prompt text for fake)
    # the answer's grammar matcher (xgrammar, hf) or constraint (fake); None: free. With n > 1 and a
    # stateful matcher: a list of n matchers, one per choice (see ``grammar_for``)
    grammar: Any = None
    grammar_param: str = "response_format"  # the public parameter the grammar comes from (its errors name it)
    prefix_key: Any = None  # hf: the prompt's ``prefix.PromptKey`` (ids + media digests), made at prepare

    @property
    def rows(self) -> int:
        """Batch rows the request takes once it runs (its ``n`` choices): its weight in admission."""
        return self.sampling.n

    def grammar_for(self, index: int) -> Any:
        """The grammar of choice ``index``: its own matcher when ``grammar`` is a list, else ``grammar``."""
        return self.grammar[index] if isinstance(self.grammar, list) else self.grammar


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the service learns of an admitted request: it is queued, its prompt has ``prompt_tokens``."""

    request_id: str
    prompt_tokens: int


@dataclass(slots=True)
class EngineStats:
    running: int  # requests in the running batch (or being prefilled)
    queued: int  # admitted requests waiting for a batch slot (or still being prepared)


@dataclass(frozen=True, slots=True)
class KVCacheStats:
    """The KV cache after a step: bytes reserved by the running rows (each padded to the longest
    prompt + max_tokens), bytes of kept prompt prefixes, the budget (0: none); prefix-cache totals since
    the engine started: hits, misses, prompt tokens reused; and, with CUDA graphs on
    (``kv_slots.GraphCounts``), decode steps replayed from a graph or run eagerly, captures and failed
    captures since the engine started. ``epoch``: which engine counted them (an engine
    process stamps its own id; "" for the in-thread engine, which lives as long as the service), so that a
    restarted engine's totals, which start at 0 again, are told apart from an older report."""

    rows_bytes: int
    prefix_bytes: int
    budget_bytes: int
    hits: int
    misses: int
    reused_tokens: int
    epoch: str = ""
    graphed_steps: int = 0
    eager_steps: int = 0
    graph_captures: int = 0
    graph_capture_failures: int = 0

    def totals(self) -> tuple[int, ...]:
        """The counters' totals, in the order ``ModelMetrics`` feeds them to its counters."""
        return (
            self.hits,
            self.misses,
            self.reused_tokens,
            self.graphed_steps,
            self.eager_steps,
            self.graph_captures,
            self.graph_capture_failures,
        )


@dataclass(frozen=True, slots=True)
class MediaCacheStats:
    """The processed-media cache (``multimodal/media_cache.py``): totals since the cache was made (hits,
    misses, entries evicted) and its size now (entries, bytes of tensors). Snapshots are taken by several
    prepare threads and may reach an observer out of order: ``version`` counts the cache's changes (a
    larger one is newer) and ``epoch`` names the cache (a new engine's cache has a new one, its totals
    start at 0 again)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    nbytes: int = 0
    version: int = 0
    epoch: str = ""

    def newer_than(self, other: MediaCacheStats | None) -> bool:
        """Whether this snapshot supersedes ``other`` (None, another cache's, or an older one)."""
        return other is None or self.epoch != other.epoch or self.version > other.version


MemoryRows = dict[tuple[str, str], float]
"""Memory in bytes by ``(device, kind)``, e.g. ``("cpu", "rss")``, ``("cuda:0", "allocated")``."""


class EngineObserver(Protocol):
    """Metrics hooks of every engine, called from the engine's thread; keep them cheap and non-raising."""

    def on_step(self, batch_size: int, seconds: float, prefill_tokens: int, prefills: int = 0) -> None:
        """After every step with rows: rows decoded or prefilled in it, its wall time in seconds, its
        prefill work in budget units (prompt tokens plus visual tokens encoded, see ``prefill_cost``) and
        how many prompts finished their prefill in it (once per request, whatever its ``n``)."""

    def on_first_token(self, request_id: str, seconds: float) -> None:
        """A request's first generated token, ``seconds`` after it was queued."""

    def on_finish(self, request_id: str, finish_reason: str, completion_tokens: int) -> None:
        """A request's end (every queued request gets exactly one)."""

    def on_memory(self, rows: MemoryRows) -> None:
        """An engine process's own memory (``ProcessEngine``: at most once a second)."""

    def on_kv_cache(self, stats: KVCacheStats) -> None:
        """The KV cache after a step that changed it (the HF engine only; optional: engines call it only
        when the observer has it)."""

    def on_media_cache(self, stats: MediaCacheStats) -> None:
        """The processed-media cache after a prepare (the HF engine only, from its prepare threads; optional
        like ``on_kv_cache``)."""


class Engine(Protocol):
    """What the model service calls (``lifecycle.py``, ``routes.py``); nothing else is reached for."""

    model_id: str
    max_batch_size: int
    failure: str | None
    """Why the engine died on its own (``ProcessEngine``'s child); None while it lives. In-thread
    engines never die on their own."""

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Call ``on_exit(reason)`` once, from an engine thread, if the engine dies on its own (never after
        ``shutdown``); its requests then end with an ``error`` FinalOutput. Call before ``start``."""

    def start(self, sink: OutputSink) -> None:
        """Start the engine thread (after weights are loaded)."""

    async def admit(self, request: GenerateRequest) -> Admitted:
        """Count the request, prepare it (decode media, render the chat template, tokenize, check the
        context length) and queue it for generation: one call, one round trip to an engine process.

        Raises, before any prepare work: ``NotReady`` once shutdown began (or the engine died),
        ``Conflict`` for a request id already queued or running, ``Overloaded`` when the queue is full;
        then ``InvalidRequest`` / ``InvalidMedia`` / ``PromptTooLong`` from the prepare work. A request
        refused (or whose caller went away) holds nothing afterwards."""

    def cancel(self, request_id: str) -> bool:
        """Stop the request within one decode step (or drop it from the queue); its ``FinalOutput``
        with ``finish_reason="cancelled"`` follows through the sink. False when not admitted, finished
        or already cancelled."""

    def stats(self) -> EngineStats: ...

    def shutdown(self, grace_seconds: float) -> None:
        """Stop admitting; let running requests finish for up to ``grace_seconds``, then cancel the rest
        (each still gets its FinalOutput); then stop the thread. Blocking; call off the event loop."""
