"""Iteration-level batching: one thread owns the model and runs the step loop.

One step: apply cancellations; prefill, at most ``max_step_tokens`` units of it per step (below); one
decode step for every running row; sample all rows at once (running and just-prefilled) on the whole logits
tensor; detokenize per row; report every row's output in ONE sink call; retire finished and cancelled rows.

Prefill never delays the running rows by more than one budget per step. A prompt costs its prompt tokens
(the text decoder's work, visual placeholders included) plus its visual tokens (the vision encoder's work):
``prefill_cost``, the units ``ChunkedPrefill`` charges too. Queued prompts whose cost fits the budget left
are prefilled whole, each alone with its pixels, and join the batch in the same step; a prompt over the
budget is prefilled in budget-sized chunks over several steps (``ChunkedPrefill``: its images and videos,
as many per step as fit, then slices of the text), one such prompt at a time, in arrival order, with a
decode step of the running rows in every step. The one exception to the bound is a single image or video
whose own visual tokens exceed the budget: one item's encoder pass cannot be split, so it runs alone in its
step (nothing else is prefilled in that step, neither its own text nor another request's). The worst stall
of the running rows is therefore one decode step plus max(``max_step_tokens``, the largest item's visual
tokens) units of prefill; the per-item visual-token cap of the media limits bounds the second term, and
since an item's encoder time grows faster than linearly with its tokens (its attention spans the item),
that cap, not the budget, sets the worst stall.

A request can only hurt itself. Everything that can fail for one row alone is tried for that row alone
before it joins (sampler values, generator seed and group tensors: ``_set_up_rows``; its prefill with its
media). A batched call that still raises (decode, the sampler's set-up, sampling) is retried on subsets of
the rows apart (bisection, ``isolate.culprits``; decode on copies of the rows' cache, sampling with the
step's draws already taken, so seeded rows still draw once per step): the rows that fail on their own end
with "error", the others continue with the tokens they would have had; a fault that cannot be pinned on
some rows fails every row of the step, and the loop lives on.

Prefix cache (``prefix.py``): every prefilled prompt's KV is kept (least recently used first out, within
``kv_cache_bytes``); a queued prompt that shares at least ``prefix_min_tokens`` with a kept one (same token
ids, same media pixels) is prefilled from that prefix on, by ``ChunkedPrefill`` (the media items within the
prefix are not encoded again), and costs the step budget only its new part. Its ``FinalOutput`` reports the
reused tokens as ``cached_tokens``.

Queue, capacity, cancel, drain and the duplicate rule are the admission core's (``admission.py``, the
same for every engine); this module is what a step does with the queue.

Constrained answers and reasoning budgets (``_constrain``, before sampling, on the step's logits in place):
a row still reasoning whose ``max_reasoning_tokens`` are spent gets ``</think>`` forced (every other logit
-inf), as the model would close the block; a row in its answer with a grammar (``Prepared.grammar``, an
xgrammar matcher compiled at prepare time) gets its matcher's token bitmask, filled for the constrained rows
only, and accepts each sampled token afterwards. Unconstrained rows are never touched, so their tokens are
what they would be alone. A matcher that raises fails its row alone.

Several choices (``n`` > 1): the request takes ``n`` batch slots at once (it waits in the queue until they
are free; admission counts it as ``n`` rows). Its prompt is prefilled ONCE, whole or in chunks (and kept
once in the prefix cache); the one prefilled row is then forked into ``n`` rows (``_fork``: concat copies
the cache row-wise, slots take views that the join copies into the slots; the last logits repeated), each
with its own sampler seeded with ``choice_seed(seed, i)``, detokenizer, grammar matcher and reasoning
budget. They run as independent rows; ``choices.ChoiceGroup``
turns each row's end into its choice's ending output and the request's one ``FinalOutput`` after the last.
A cancel stops every row of the request; a row that fails fails its siblings too (the request fails as a
whole, and isolation counts the siblings with the culprit).

Finish reasons: ``stop`` (an eos token or a stop string), ``length`` (``max_tokens``), ``cancelled`` (cancel
or shutdown), ``error`` (as above: the affected requests fail, the loop lives on).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch

from services.model.engine import batch as kv
from services.model.engine.admission import AdmissionQueue
from services.model.engine.base import (
    EngineObserver,
    EngineStats,
    FinalOutput,
    KVCacheStats,
    LogprobEntry,
    Output,
    OutputSink,
    Prepared,
    TokenLogprobs,
    TokenOutput,
)
from services.model.engine.choices import ChoiceGroup, tail_output
from services.model.engine.chunked import ChunkedPrefill, visual_tokens
from services.model.engine.detokenize import IncrementalDetokenizer, Piece, TokenTable
from services.model.engine.grammar import allocate_bitmask, apply_bitmasks, pick_greedy
from services.model.engine.isolate import Probe, culprits
from services.model.engine.kv_slots import SlotBatch, SlotConfig, attention_kind, reserved_shape
from services.model.engine.logprobs import entries as logprob_entries
from services.model.engine.prefix import PrefixCache, PrefixEntry, PromptKey, prompt_key
from services.model.engine.sampling import (
    BatchSampler,
    InvalidSampling,
    RowSampler,
    SamplingConfig,
    draw_step,
    sampling_config,
)
from services.protocol.generate import choice_seed

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int = 16
    max_queue: int = 64
    max_step_tokens: int = 2048
    eos_token_ids: frozenset[int] = frozenset({151645, 151643})
    starts_in_reasoning: bool = True  # the Thinking template's prompt opens <think>
    pick_greedy: bool = True  # constrained greedy rows: pick among the allowed ids (no full-row mask)
    prefix_cache: bool = True  # keep prompts' KV and reuse shared prefixes (prefix.py)
    prefix_min_tokens: int = 16  # shortest shared prefix worth reusing
    kv_cache_bytes: int = 0  # KV memory budget in bytes (running rows + kept prefixes); 0: no limit
    kv_layout: str = "concat"  # KV_LAYOUT: "concat" (one DynamicCache) or "slots" (engine/kv_slots.py)
    kv_static_shapes: bool = False  # slots: every decode step spans the whole slot bucket and column capacity
    cuda_graphs: bool = False  # slots + static shapes on CUDA: replay the decode forward from a CUDA graph


@dataclass(slots=True, eq=False)
class _Row:
    prepared: Prepared
    submitted_at: float
    sampler: RowSampler
    detok: IncrementalDetokenizer
    max_tokens: int
    group: ChoiceGroup  # the request's choices (n = 1: this row alone)
    index: int = 0  # the choice this row generates
    choices: list[_Row] = field(default_factory=list)  # the request's rows, this one included
    grammar: Any = None  # xgrammar GrammarMatcher over the answer, or None
    reasoning_budget: int | None = None  # reasoning tokens before </think> is forced; None: no limit
    reasoning_tokens: int = 0
    generated: int = 0
    unreported: int = 0  # generated tokens not yet covered by a TokenOutput
    top_logprobs: int | None = None  # None: no logprobs for this row
    prefix: tuple[PrefixEntry, int] | None = None  # the cached prefix its prefill starts from
    logprobs: TokenLogprobs | None = None  # entries of the unreported tokens (rows with top_logprobs)
    finish_reason: str | None = None
    error: str | None = None
    error_code: str = "internal"  # see ``FinalOutput.error_code``

    @property
    def request_id(self) -> str:
        return self.prepared.request_id


@dataclass(slots=True)
class _Step:
    outputs: list[tuple[str, Output]] = field(default_factory=list)
    prefill_tokens: int = 0  # prefill work of this step in budget units (see prefill_cost)
    batch_size: int = 0  # rows sampled in this step
    admitted: list[_Row] = field(default_factory=list)  # prefilled in this step
    prefills: int = 0  # prompts whose prefill completed in this step (once per request, whatever its n)


def prefill_cost(model: Any, prepared: Prepared, cached: int = 0) -> int:
    """What prefilling ``prepared`` costs of a step's budget: its prompt tokens (the text decoder's work,
    visual placeholders included) plus its visual tokens (the vision encoder's work), the same units
    ``ChunkedPrefill`` charges. With its first ``cached`` tokens taken from the prefix cache: only the
    tokens after them and the visual tokens of the items after them."""
    if cached == 0:
        return prepared.prompt_tokens + visual_tokens(model, prepared.inputs)
    key = prepared.prefix_key
    assert key is not None  # set by the lookup that found the prefix
    visual = sum(s.end - s.start for s in key.spans if s.start >= cached)
    return prepared.prompt_tokens - cached + visual


def to_sampling_config(prepared: Prepared, index: int = 0) -> SamplingConfig:
    """The sampler configuration of choice ``index`` of ``prepared`` (its seed: ``choice_seed``)."""
    s = prepared.sampling
    return sampling_config(
        temperature=1.0 if s.temperature is None else s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=choice_seed(s.seed, index),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
    )


class Scheduler:
    """The batching loop around one model. ``submit``/``cancel``/``stats`` are thread-safe."""

    def __init__(
        self,
        model: Any,
        table: TokenTable,
        config: SchedulerConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        self._model = model
        self._table = table
        self._config = config
        self._observer = observer
        self._device = next(model.parameters()).device
        self._sampler = BatchSampler(model.get_output_embeddings().weight.shape[0], self._device)
        self._logits = kv.LogitsBuffer(model)  # every step's (B, V) logits, written in place
        self._bitmask: torch.Tensor | None = None  # grammar masks, (max_batch, V/32) int32, made on first use
        self.admission: AdmissionQueue[Prepared] = AdmissionQueue(config.max_batch_size, config.max_queue)
        self._rows: list[_Row] = []
        self._sampler_stale = False  # the rows changed since the last BatchSampler.set_rows
        # a long prompt being prefilled: its request's rows (one per choice) and the job
        self._chunked: tuple[list[_Row], ChunkedPrefill] | None = None
        self._batch: kv.Batch | None = None
        self.prefix = PrefixCache(config.prefix_min_tokens) if config.prefix_cache else None
        self._kv_per_token = kv.bytes_per_token(model)  # K and V of one token in every layer
        self._slot_cfg = self._configure_slots(model)
        self._admitting: list[_Row] = []  # rows prefilled in the step in progress, not merged yet
        self._kv_reported: KVCacheStats | None = None
        self._sink: OutputSink | None = None
        self._threaded = False

    # ---- public, any thread -------------------------------------------------------------------------

    def start(self, sink: OutputSink) -> None:
        self._sink = sink
        self._threaded = True
        self.admission.start(self._step_in_inference_mode, "engine-scheduler")

    def bind(self, sink: OutputSink) -> None:
        """Set the sink without starting the thread: the caller drives the loop with :meth:`step_once`
        (tests that need exact arrival steps, in-process benchmarks)."""
        self._sink = sink

    def step_once(self) -> bool:
        """Run one step in the calling thread; False when there was nothing to do. Never while the
        loop thread runs."""
        assert not self._threaded, "the scheduler thread owns the loop"
        if not self.admission.has_work():
            return False
        self._step_in_inference_mode()
        return True

    def submit(self, prepared: Prepared) -> None:
        """Reserve and queue in one; raises ``NotReady``, ``Conflict``, ``Overloaded``."""
        self.admission.submit(prepared)

    def cancel(self, request_id: str) -> bool:
        return self.admission.cancel(request_id)

    def stats(self) -> EngineStats:
        return self.admission.stats()

    def _occupied(self) -> int:
        """Batch slots in use: running rows and the prompt being prefilled in chunks."""
        return len(self._rows) + (len(self._chunked[0]) if self._chunked is not None else 0)

    def shutdown(self, grace_seconds: float) -> None:
        """Drain as ``AdmissionQueue.shutdown`` does (blocking)."""
        self.admission.shutdown(grace_seconds)

    # ---- the engine thread --------------------------------------------------------------------------

    def _step_in_inference_mode(self) -> None:
        with torch.inference_mode():
            self._step()

    def _step(self) -> None:
        started = time.perf_counter()
        step = _Step()
        try:
            self._apply_cancels(step)
            self._retire()
            new_rows, new_logits, new_state = self._admit(step)
            logits = self._forward(step, new_rows, new_logits, new_state)
            if logits is not None:
                step.batch_size = int(logits.shape[0])
                self._sample_and_emit(step, logits)
            self._retire()
        except Exception as exc:  # a bug or a device failure outside the guarded model calls
            log.exception("scheduler step failed")
            chunked = self._chunked[0] if self._chunked is not None else []
            self._fail_rows(step, [*self._rows, *step.admitted, *chunked], f"internal error: {exc}")
            self._rows, self._batch, self._chunked, self._admitting = [], None, None, []
            self._sampler_stale = True
        # The observer first: an engine process sends the step's timing with its outputs, one message.
        if self._observer is not None:
            if step.batch_size:
                seconds = time.perf_counter() - started
                self._observer.on_step(step.batch_size, seconds, step.prefill_tokens, prefills=step.prefills)
            try:  # also after a step of cancels only: the rows they held are free (when changed)
                self._report_kv()
            except Exception:  # a metric: the step's outputs still go to the sink
                log.exception("reporting the KV cache's state failed")
        if step.outputs and self._sink is not None:
            self._sink(step.outputs)

    def _apply_cancels(self, step: _Step) -> None:
        dropped, cancels = self.admission.take_cancels()
        for prepared in dropped:
            self._finish_unstarted(step, prepared, "cancelled")
        if not cancels:
            return
        chunked = self._chunked[0] if self._chunked is not None else []
        for row in [*self._rows, *chunked]:
            if row.request_id in cancels and row.finish_reason is None:
                row.finish_reason = "cancelled"
                self._final(step, row)
        if chunked and chunked[0].finish_reason is not None:
            self._chunked = None  # its partial cache is dropped with it

    def _admit(self, step: _Step) -> tuple[list[_Row], list[torch.Tensor], list[kv.BatchTensors]]:
        """Queued requests that start in this step, each set up and prefilled alone (a failure there ends
        that request only); returns the rows that join, their last logits (1, V) and batch states."""
        rows: list[_Row] = []
        self._admitting = rows  # counted in the KV reservation until they are merged
        logits: list[torch.Tensor] = []
        states: list[kv.BatchTensors] = []
        if self._chunked is not None:
            self._prefill_chunk(step, rows, logits, states)
        while self._occupied() + len(rows) < self._config.max_batch_size and self._chunked is None:
            nxt = self._pop_admissible(step, len(rows))
            if nxt is None:
                break
            cost, prepared, submitted, hit = nxt
            choices = self._set_up_rows(step, prepared, submitted)
            if choices is None:
                continue
            for row in choices:
                row.prefix = hit
            if step.prefill_tokens + cost > self._config.max_step_tokens:
                self._start_chunked(step, choices)
                self._prefill_chunk(step, rows, logits, states)
                break
            step.prefill_tokens += cost
            self._prefill_whole(step, choices, rows, logits, states)
        return rows, logits, states

    def _pop_admissible(
        self, step: _Step, joining: int
    ) -> tuple[int, Prepared, float, tuple[PrefixEntry, int] | None] | None:
        """The next queued request and its prefill cost when it can start in this step: its rows (its
        ``n``) fit the free batch slots (``joining`` rows start in this step already), and a prompt whose
        cost fits the budget left, or a long one (to be chunked) at the start of a step's budget; in
        arrival order. A request whose cost cannot be computed fails alone."""
        while (prepared := self.admission.peek()) is not None:
            if self._occupied() + joining + prepared.rows > self._config.max_batch_size:
                return None  # its n rows wait for free slots (admission caps n at the batch size)
            try:
                hit = self._find_prefix(prepared)
                cost = prefill_cost(self._model, prepared, hit[1] if hit else 0)
            except Exception as exc:
                log.exception("prefill cost of %s failed", prepared.request_id)
                self.admission.pop()
                self._finish_unstarted(step, prepared, "error", f"request set-up failed: {exc}")
                continue
            if step.prefill_tokens + cost > self._config.max_step_tokens and step.prefill_tokens > 0:
                return None
            if not self._kv_room_for(prepared):
                return None  # waits (in arrival order) until finished rows free their KV
            popped = self.admission.pop()
            assert popped is not None and popped[0] is prepared  # only this thread takes from the queue
            if self.prefix is not None:
                self.prefix.record(hit)
            return cost, prepared, popped[1], hit
        return None

    def kv_bytes(self) -> tuple[int, int, int]:
        """KV memory in bytes: (reserved by the running rows, held by the prefix cache, the budget; 0: none).
        A row reserves the padded rectangle it may grow to (see :meth:`_kv_reserved`)."""
        prefix = self.prefix.nbytes if self.prefix is not None else 0
        return self._kv_reserved([]), prefix, self._config.kv_cache_bytes

    @property
    def slot_config(self) -> SlotConfig | None:
        """The slot buffers' configuration (None: ``KV_LAYOUT=concat``); ``prepare`` sizes requests by it."""
        return self._slot_cfg

    def _configure_slots(self, model: Any) -> SlotConfig | None:
        """``KV_LAYOUT=slots``: buffers of at most the batch size in slots and, under a KV budget, S x C
        within the budget (``SlotConfig.budget_tokens``). Raises ValueError, before any request, for an
        attention implementation the slots cannot serve. ``KV_STATIC_SHAPES`` with concat, and
        ``CUDA_GRAPHS`` without slots, static shapes and a CUDA device, have no effect: a warning says so."""
        config = self._config
        devices = {p.device for p in model.parameters()}
        graphs = config.kv_layout == "slots" and config.kv_static_shapes and self._device.type == "cuda"
        graphs = graphs and len(devices) == 1  # a graph is one device's
        if config.cuda_graphs and not graphs:
            log.warning(
                "CUDA_GRAPHS=true has no effect here: it needs KV_LAYOUT=slots, KV_STATIC_SHAPES=true and "
                "the model on one CUDA device (KV_LAYOUT=%s, KV_STATIC_SHAPES=%s, devices %s)",
                config.kv_layout,
                config.kv_static_shapes,
                ", ".join(sorted(map(str, devices))),
            )
        if config.kv_layout != "slots":
            if config.kv_static_shapes:
                log.warning(
                    "KV_STATIC_SHAPES=true has no effect with KV_LAYOUT=%s (slots only)", config.kv_layout
                )
            return None
        attention_kind(model)
        budget = config.kv_cache_bytes // self._kv_per_token if config.kv_cache_bytes else 0
        return SlotConfig(
            config.max_batch_size, budget, config.kv_static_shapes, graphs=graphs and config.cuda_graphs
        )

    def _kv_lengths(self) -> list[int]:
        chunked = self._chunked[0] if self._chunked is not None else []
        rows = [*self._rows, *self._admitting, *chunked]
        return [r.prepared.prompt_tokens + r.max_tokens for r in rows if r.finish_reason is None]

    def _kv_reserved(self, extra: list[int]) -> int:
        """Bytes of the batch's KV at its largest with ``extra`` more rows of those lengths (prompt +
        max_tokens). ``concat``: every row padded to the longest. ``slots``: the S x C rectangle the slot
        buffers may reach (``kv_slots.reserved_shape``: the rows not merged yet take the lowest free slots;
        C in whole blocks for the longest row, but under a KV budget at most ``budget_tokens // S`` unless
        that row itself needs more, see ``SlotConfig.columns``), and never less than what they hold now."""
        lengths = self._kv_lengths() + extra
        if self._slot_cfg is None:
            return len(lengths) * max(lengths, default=0) * self._kv_per_token
        chunked = self._chunked[0] if self._chunked is not None else []
        joining = len(self._admitting) + len(chunked) + len(extra)
        batch = self._batch if isinstance(self._batch, SlotBatch) else None
        slots, columns = reserved_shape(batch, self._slot_cfg, joining, max(lengths, default=0))
        return slots * columns * self._kv_per_token

    def _kv_room_for(self, prepared: Prepared) -> bool:
        """Whether the request's rows fit the KV budget next to the running rows, after evicting kept
        prefixes as needed (``prepare`` already refused a request that cannot fit even alone)."""
        budget = self._config.kv_cache_bytes
        if not budget:
            return True
        need = prepared.prompt_tokens + (prepared.sampling.max_tokens or 1)
        reserved = self._kv_reserved([need] * _rows_of(prepared))
        if self.prefix is not None and reserved + self.prefix.nbytes > budget:
            self.prefix.evict(reserved + self.prefix.nbytes - budget)
        held = self.prefix.nbytes if self.prefix is not None else 0
        return reserved + held <= budget or not self._kv_lengths()

    def _report_kv(self) -> None:
        """Tell the observer the KV cache's state when it changed since the last report."""
        on_kv = getattr(self._observer, "on_kv_cache", None)
        if on_kv is None:
            return
        rows, prefix, budget = self.kv_bytes()
        s = self.prefix.stats if self.prefix is not None else None
        cfg = self._slot_cfg
        graphs = asdict(cfg.graph_counts) if cfg is not None and cfg.graphs else {}
        stats = KVCacheStats(
            rows, prefix, budget, *((s.hits, s.misses, s.reused_tokens) if s else (0, 0, 0)), **graphs
        )
        if stats != self._kv_reported:
            self._kv_reported = stats
            on_kv(stats)

    def _find_prefix(self, prepared: Prepared) -> tuple[PrefixEntry, int] | None:
        """The kept prefix ``prepared`` would start from (None: none, or no prefix cache)."""
        if self.prefix is None or not len(self.prefix):
            return None
        return self.prefix.find(self._prompt_key(prepared))

    def _prompt_key(self, prepared: Prepared) -> PromptKey:
        if prepared.prefix_key is None:  # prepared elsewhere than HFEngine.prepare_sync (tests)
            prepared.prefix_key = prompt_key(self._model.config, prepared.inputs)
        return prepared.prefix_key

    def _keep_prefix(self, row: _Row, state: kv.BatchTensors) -> None:
        try:
            self._remember(row, state)
        except Exception:  # keeping it is an optimisation: the row goes on without
            log.exception("keeping the prefix of %s failed", row.request_id)

    def _remember(self, row: _Row, state: kv.BatchTensors) -> None:
        """Keep the just-prefilled prompt's KV in the prefix cache, within the budget left by the rows."""
        if self.prefix is None:
            return
        layers = [(layer.keys, layer.values) for layer in state.cache.layers]
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        budget = self._config.kv_cache_bytes
        if budget:
            need = row.prepared.prompt_tokens + row.max_tokens
            room = budget - self._kv_reserved([need] * _rows_of(row.prepared)) - size
            if room < 0:
                return
            self.prefix.evict(self.prefix.nbytes - room)
        self.prefix.insert(self._prompt_key(row.prepared), layers)

    def _set_up_rows(self, step: _Step, prepared: Prepared, submitted: float) -> list[_Row] | None:
        """The request's rows (one per choice) with everything that can fail for it alone tried for it
        alone (sampler values, generator seeding, its group's parameter tensors, detokenizer); None when
        it was refused (finished with "error" in this step)."""
        try:
            group = ChoiceGroup(prepared.request_id, prepared.rows, prepared.prompt_tokens)
            rows = [self._new_row(prepared, submitted, group, i) for i in range(prepared.rows)]
            for row in rows:
                row.choices = rows
                self._sampler.check(row.sampler)
        except Exception as exc:
            if isinstance(exc, InvalidSampling):
                message = f"invalid sampling parameters: {exc}"
            else:
                log.exception("set-up of %s failed", prepared.request_id)
                message = f"request set-up failed: {exc}"
            self._finish_unstarted(step, prepared, "error", message)
            return None
        return rows

    def _prefill_whole(
        self,
        step: _Step,
        choices: list[_Row],
        rows: list[_Row],
        logits: list[torch.Tensor],
        states: list[kv.BatchTensors],
    ) -> None:
        """Prefill the request's whole prompt with its media, alone and once (from its cached prefix on,
        if any); its rows (one per choice) join the batch in this step."""
        row = choices[0]
        try:
            if row.prefix is None:
                row_logits, state = kv.prefill(self._model, row.prepared.inputs, self._device)
            else:
                job = self._chunked_job(row)
                _, found = job.advance(job.cost)
                assert found is not None  # a budget of the whole cost finishes the prompt
                row_logits, state = found, job.state()
        except Exception as exc:
            log.exception("prefill of %s failed", row.request_id)
            self._finish_unstarted(step, row.prepared, "error", f"prefill failed: {exc}")
            return
        self._join(step, choices, row_logits, state, rows, logits, states)

    def _join(
        self,
        step: _Step,
        choices: list[_Row],
        row_logits: torch.Tensor,
        state: kv.BatchTensors,
        rows: list[_Row],
        logits: list[torch.Tensor],
        states: list[kv.BatchTensors],
    ) -> None:
        """A prefilled prompt (its last logits (1, V), its one-row state) joins this step's new rows: kept
        in the prefix cache, then forked into one row per choice (a failed fork fails the request)."""
        self._keep_prefix(choices[0], state)
        try:
            state = _fork(state, len(choices), self._slot_cfg is not None)
        except Exception as exc:
            log.exception("fork of %s failed", choices[0].request_id)
            self._fail_rows(step, choices, f"prefill failed: {exc}")
            return
        rows.extend(choices)
        step.admitted.extend(choices)
        logits.extend([row_logits] * len(choices))
        states.append(state)
        step.prefills += 1

    def _start_chunked(self, step: _Step, choices: list[_Row]) -> None:
        row = choices[0]
        try:
            job = self._chunked_job(row)
        except Exception as exc:
            log.exception("prefill of %s failed", row.request_id)
            self._finish_unstarted(step, row.prepared, "error", f"prefill failed: {exc}")
            return
        self._chunked = (choices, job)

    def _chunked_job(self, row: _Row) -> ChunkedPrefill:
        prefix = None if row.prefix is None else (row.prefix[0].layers, row.prefix[1])
        return ChunkedPrefill(self._model, row.prepared.inputs, self._device, prefix)

    def _prefill_chunk(
        self, step: _Step, rows: list[_Row], logits: list[torch.Tensor], states: list[kv.BatchTensors]
    ) -> None:
        """The next piece of the long prompt in progress; it joins the batch after its last piece."""
        if self._chunked is None:
            return
        choices, job = self._chunked
        try:
            spent, row_logits = job.advance(self._config.max_step_tokens - step.prefill_tokens)
            state = job.state() if row_logits is not None else None
        except Exception as exc:
            log.exception("prefill of %s failed", choices[0].request_id)
            self._chunked = None
            self._fail_rows(step, choices, f"prefill failed: {exc}")
            return
        step.prefill_tokens += spent
        if row_logits is None or state is None:
            return
        self._chunked = None
        self._join(step, choices, row_logits, state, rows, logits, states)

    def _new_row(self, prepared: Prepared, submitted: float, group: ChoiceGroup, index: int) -> _Row:
        cfg = to_sampling_config(prepared, index)
        vocab = self._sampler.vocab_size
        prompt_ids = prepared.inputs["input_ids"] if cfg.repetition_penalty != 1.0 else torch.empty(0)
        return _Row(
            prepared=prepared,
            submitted_at=submitted,
            sampler=RowSampler(cfg, prompt_ids, vocab),
            detok=IncrementalDetokenizer(
                self._table, prepared.sampling.stop, in_reasoning=self._config.starts_in_reasoning
            ),
            max_tokens=prepared.sampling.max_tokens or 1,
            group=group,
            index=index,
            grammar=prepared.grammar_for(index),
            reasoning_budget=prepared.sampling.max_reasoning_tokens,
            top_logprobs=prepared.sampling.top_logprobs,
        )

    def _forward(
        self,
        step: _Step,
        new_rows: list[_Row],
        new_logits: list[torch.Tensor],
        new_state: list[kv.BatchTensors],
    ) -> torch.Tensor | None:
        """Decode the running rows, then merge the new ones in; the logits of all rows in the new order.
        The batch settles here, after the step's joins (``slots``: sparse rows are compacted, as part of
        the merge when rows join), not right after its leaves: a leave and a join in consecutive steps then
        copy no KV."""
        running = len(self._rows) if self._batch is not None else 0
        self._logits.rows(running + len(new_logits))  # room for the whole step: views below never move
        if running:
            running = self._decode(step)
        logits = self._logits.rows(running + len(new_logits))
        for i, row_logits in enumerate(new_logits):
            logits[running + i].copy_(row_logits.reshape(-1))
        if new_rows:
            base = self._slot_base(new_state)
            self._batch = kv.merge(([base] if base is not None else []) + new_state, self._slot_cfg)
            self._rows = self._rows + new_rows
            self._admitting = []
            self._sampler_stale = True
        elif self._batch is not None and self._rows:
            self._slot_base([])
            kv.settle(self._batch)
        return logits if logits.shape[0] else None

    def _slot_base(self, new_state: list[kv.BatchTensors]) -> kv.Batch | None:
        """The batch the step's new rows merge into; ``slots``: made here when none runs yet, and told the
        tokens its rows (new ones included) may reach (``SlotBatch.longest``: prompt + max_tokens, what
        :meth:`_kv_reserved` reserves for), so that under a KV budget it takes the slot count admission
        reserved (``SlotConfig.slots_for``)."""
        batch = self._batch
        if batch is None and self._slot_cfg is not None and new_state:
            batch = SlotBatch.like(self._slot_cfg, new_state[0])
        if isinstance(batch, SlotBatch):
            batch.longest = max(self._kv_lengths(), default=0)
        return batch

    def _decode(self, step: _Step) -> int:
        """One decode step of the running rows into the first rows of the logits buffer; returns how many
        rows are left. When the batched call raises, the rows that fail on their own (decoded apart, on
        copies) are failed and the rest decoded again; a fault that cannot be isolated, or a batch whose KV
        was lost (``kv.lost``), fails them all."""
        batch = self._batch
        assert batch is not None
        saved = kv.snapshot(batch)
        try:
            return self._decode_rows()
        except Exception as exc:
            log.exception("decode step failed for a batch of %d", len(self._rows))
            message = f"decode step failed: {exc}"
            if kv.lost(batch):  # its KV is gone (a reallocation failed half-way): nothing to probe
                self._fail_rows(step, self._rows, message)
                self._rows, self._batch, self._sampler_stale = [], None, True
                return 0
            kv.restore(batch, saved)

        def probe(idx: list[int]) -> None:  # on a copy of those rows: the batch stays as it is
            kv.decode(self._model, kv.take(batch, idx))

        return self._recover(step, "decode", message, probe, lambda keep: self._decode_rows()) or 0

    def _decode_rows(self) -> int:
        assert self._batch is not None
        kv.decode(self._model, self._batch, out=self._logits.rows(len(self._rows)))
        return len(self._rows)

    def _recover(
        self, step: _Step, what: str, message: str, probe: Probe, retry: Callable[[list[int]], _T]
    ) -> _T | None:
        """After the batched ``what`` raised for the running rows: fail the rows that make ``probe`` fail
        apart (see ``isolate.culprits``), then ``retry`` with the indices (old numbering) of the rows left;
        when the fault cannot be pinned on some rows, or the retry raises, every row fails (None)."""
        bad = culprits(len(self._rows), probe)
        if bad is not None:  # a failing row fails its request's other choices with it
            failing = {self._rows[i].request_id for i in bad}
            bad = [i for i, r in enumerate(self._rows) if r.request_id in failing]
        if bad is None:
            log.error("the %s fault could not be isolated: failing the %d rows", what, len(self._rows))
        else:
            keep = sorted(set(range(len(self._rows))) - set(bad))
            log.warning("%s failed because of %d of %d rows: failing those", what, len(bad), len(self._rows))
            self._fail_rows(step, [self._rows[i] for i in bad], message)
            self._retire()
            try:
                return retry(keep)
            except Exception:
                log.exception("%s failed again without the rows isolated", what)
        self._fail_rows(step, self._rows, message)
        self._rows, self._batch, self._sampler_stale = [], None, True
        return None

    def _sample_and_emit(self, step: _Step, logits: torch.Tensor) -> None:
        picks = self._constrain(step, logits)
        draws = draw_step([r.sampler for r in self._rows])  # once per step, whatever is retried below
        sampled = self._sample(step, logits, draws)
        if sampled is None:
            return
        tokens, token_ids = sampled
        for i, row in enumerate(self._rows):  # rows whose token was picked among their allowed ids
            if row in picks:
                token_ids[i] = picks[row]
                tokens[i] = picks[row]
        self._sampler.record(token_ids)
        assert self._batch is not None
        self._batch.tokens = tokens.reshape(-1, 1)
        entries = self._logprobs(step, tokens, token_ids)
        now = time.perf_counter()
        for row, token in zip(self._rows, token_ids, strict=True):
            if row.finish_reason is not None:
                continue  # failed in this step already (its grammar, its logprobs): nothing more to report
            try:
                self._keep_logprob(row, entries.get(row))
                self._advance(step, row, token, now)
            except Exception as exc:  # the row's own detokenizing or bookkeeping: that row alone fails
                log.exception("output of %s failed", row.request_id)
                self._fail_rows(step, [row], f"generation failed: {exc}")

    def _logprobs(self, step: _Step, tokens: torch.Tensor, token_ids: list[int]) -> dict[_Row, LogprobEntry]:
        """This step's logprob entry of every row that asks for them (computed for those rows only, from
        the distribution the sampler drew from); when that raises, those rows fail and the others go on."""
        wanted = [
            i for i, r in enumerate(self._rows) if r.top_logprobs is not None and r.finish_reason is None
        ]
        if not wanted:
            return {}
        try:
            k = max(self._rows[i].top_logprobs or 0 for i in wanted)
            chosen, top_ids, top_values = self._sampler.logprobs(wanted, tokens, k)
            ks = [self._rows[i].top_logprobs or 0 for i in wanted]
            found = logprob_entries(
                self._table,
                [token_ids[i] for i in wanted],
                chosen,
                [ids[:n] for ids, n in zip(top_ids, ks, strict=True)],
                [values[:n] for values, n in zip(top_values, ks, strict=True)],
            )
        except Exception as exc:
            log.exception("logprobs failed for %d rows", len(wanted))
            self._fail_rows(step, [self._rows[i] for i in wanted], f"logprobs failed: {exc}")
            return {}
        return {self._rows[i]: entry for i, entry in zip(wanted, found, strict=True)}

    def _keep_logprob(self, row: _Row, entry: LogprobEntry | None) -> None:
        """Hold the token's entry until the row's next output (it is a reasoning token while the row has
        not closed its thinking: ``</think>`` itself included)."""
        if entry is None:
            return
        if row.logprobs is None:
            row.logprobs = TokenLogprobs([], [])
        (row.logprobs.reasoning if row.detok.in_reasoning else row.logprobs.content).append(entry)

    def _sample(
        self, step: _Step, logits: torch.Tensor, draws: list[float]
    ) -> tuple[torch.Tensor, list[int]] | None:
        """Tokens (B,) of the rows left, as a tensor and a list; when the batched sampler set-up or sampling
        raises, the rows that fail on their own are failed and the rest sampled again with the same draws
        (their tokens are what they would have been); None when no row is left."""
        try:
            return self._sample_rows(logits, draws)
        except Exception as exc:
            log.exception("sampling failed for a batch of %d", len(self._rows))
            message = f"sampling failed: {exc}"

        def retry(keep: list[int]) -> tuple[torch.Tensor, list[int]]:
            kept = logits.index_select(0, torch.tensor(keep, device=logits.device))
            return self._sample_rows(kept, [draws[i] for i in keep])

        def probe(idx: list[int]) -> None:
            self._probe_sampling(logits, draws, idx)

        return self._recover(step, "sampling", message, probe, retry)

    def _sample_rows(self, logits: torch.Tensor, draws: list[float]) -> tuple[torch.Tensor, list[int]]:
        if self._sampler_stale:
            self._sampler.set_rows([r.sampler for r in self._rows])
            self._sampler_stale = False
        tokens = self._sampler.sample(logits, draws)
        return tokens, tokens.tolist()  # the step's one device -> host transfer

    def _probe_sampling(self, logits: torch.Tensor, draws: list[float], idx: list[int]) -> None:
        """Set up and sample the rows at ``idx`` apart, with their draws of this step (records nothing)."""
        probe = BatchSampler(self._sampler.vocab_size, self._sampler.device)
        probe.set_rows([self._rows[i].sampler for i in idx])
        probe.sample(logits.index_select(0, torch.tensor(idx, device=logits.device)), [draws[i] for i in idx])

    def _constrain(self, step: _Step, logits: torch.Tensor) -> dict[_Row, int]:
        """Force ``</think>`` for rows whose reasoning budget is spent and mask grammar rows in their
        answer (see the module docstring); a row whose matcher raises fails alone. Greedy rows without
        penalties whose choice is small get their token picked here (returned by row) instead of a
        masked row: the same token, without a full-row write."""
        masked: list[int] = []
        picks: dict[_Row, int] = {}
        think_end = self._table.think_end_id
        for i, row in enumerate(self._rows):
            if row.detok.in_reasoning:
                budget = row.reasoning_budget
                if budget is not None and row.reasoning_tokens >= budget and think_end is not None:
                    if self._pickable(row, logits):
                        picks[row] = think_end
                    else:
                        logits[i].fill_(float("-inf"))
                        logits[i, think_end] = 0.0
            elif row.grammar is not None and row.finish_reason is None:
                try:
                    row.grammar.fill_next_token_bitmask(self._mask_buffer(), i)
                except Exception as exc:
                    log.exception("grammar of %s failed", row.request_id)
                    self._fail_rows(step, [row], f"grammar failed: {exc}")
                    continue
                masked.append(i)
        if masked:
            masked = self._drop_dead_ends(step, masked)
        if masked:
            picks.update(self._masked(step, logits, masked))
        return picks

    def _drop_dead_ends(self, step: _Step, masked: list[int]) -> list[int]:
        """``masked`` without the rows whose filled mask allows no token (one check for all of them),
        which end as dead ends (``_dead_end``)."""
        assert self._bitmask is not None
        alive = self._bitmask[masked].any(dim=1).tolist()
        for i, ok in zip(masked, alive, strict=True):
            if not ok and self._rows[i].finish_reason is None:  # not a sibling failed with it just now
                self._dead_end(step, self._rows[i])
        return [i for i, ok in zip(masked, alive, strict=True) if ok]

    def _dead_end(self, step: _Step, row: _Row) -> None:
        """A grammar row whose matcher allows no token (it has not accepted a whole value, or end of
        sequence would be allowed): the output reached a part of the request's schema that no value
        satisfies, e.g. a pattern no string matches (the compiler lets a row walk into such a part, also an
        optional one). The client's schema, not our failure: the request ends with ``invalid_schema``."""
        param = row.prepared.grammar_param
        log.warning("%s: the output of %s reached a dead end of its JSON schema", param, row.request_id)
        message = f"{param}: the output reached a part of this JSON schema that no value satisfies "
        message += f"(the model could not continue after {row.generated} tokens)"
        self._fail_rows(step, [row], message, "invalid_schema")

    def _masked(self, step: _Step, logits: torch.Tensor, masked: list[int]) -> dict[_Row, int]:
        """``_mask_rows`` for the ``masked`` rows together; when that raises, row by row, and a row that
        still raises fails alone (masking a row twice leaves it as masked once)."""
        try:
            return self._mask_rows(logits, masked)
        except Exception:
            log.exception("grammar masking failed for a batch of %d rows", len(masked))
        picks: dict[_Row, int] = {}
        for i in masked:
            try:
                picks.update(self._mask_rows(logits, [i]))
            except Exception as exc:
                log.exception("grammar mask of %s failed", self._rows[i].request_id)
                self._fail_rows(step, [self._rows[i]], f"grammar failed: {exc}")
        return picks

    def _mask_rows(self, logits: torch.Tensor, masked: list[int]) -> dict[_Row, int]:
        """Greedy picks among the allowed ids for the rows that allow it, the bitmask applied to the others
        (in place); the picks by row."""
        assert self._bitmask is not None
        pickable = [i for i in masked if self._pickable(self._rows[i], logits)]
        picked, rest = pick_greedy(logits, self._bitmask, pickable) if pickable else ({}, [])
        rest += [i for i in masked if i not in pickable]
        if rest:
            apply_bitmasks(logits, self._bitmask, sorted(rest))
        return {self._rows[i]: token for i, token in picked.items()}

    def _pickable(self, row: _Row, logits: torch.Tensor) -> bool:
        config = row.sampler.config
        # A row with logprobs is masked instead: its numbers come from the masked distribution.
        plain = config.greedy and not config.penalised and row.top_logprobs is None
        return self._config.pick_greedy and plain and logits.is_cpu

    def _mask_buffer(self) -> torch.Tensor:
        if self._bitmask is None:
            self._bitmask = allocate_bitmask(self._config.max_batch_size + 1, self._sampler.vocab_size)
        return self._bitmask

    def _advance(self, step: _Step, row: _Row, token: int, now: float) -> None:
        row.generated += 1
        row.unreported += 1
        if row.detok.in_reasoning:
            row.reasoning_tokens += 1
        elif row.grammar is not None and not row.grammar.accept_token(token):
            raise RuntimeError(f"the grammar refused token {token}")
        if row.generated == 1 and row.index == 0 and self._observer is not None:
            self._observer.on_first_token(row.request_id, now - row.submitted_at)
        if token in self._config.eos_token_ids:
            row.finish_reason = "stop"
            piece = row.detok.finish()
        else:
            piece = row.detok.push(token)
            if piece.stopped:
                row.finish_reason = "stop"
            elif row.generated >= row.max_tokens:
                row.finish_reason = "length"
                tail = row.detok.finish()
                piece = Piece(piece.reasoning + tail.reasoning, piece.content + tail.content)
        output = None
        if piece.reasoning or piece.content:
            output = TokenOutput(piece.reasoning, piece.content, row.unreported, row.logprobs, row.index)
            row.unreported, row.logprobs = 0, None
        if row.finish_reason is not None:
            self._final(step, row, output)
        elif output is not None:
            step.outputs.append((row.request_id, output))

    def _final(self, step: _Step, row: _Row, tail: TokenOutput | None = None) -> None:
        """The row's end: its last output (``tail``, or what it has unreported: tokens that released no
        text, such as eos, a held-back stop prefix or a cancelled partial character, still count in the
        token metrics and still have their logprobs) as its choice's end, and the request's
        ``FinalOutput`` once every choice ended (``ChoiceGroup``). A row that failed fails its siblings."""
        if tail is None:
            tail = tail_output("", "", row.unreported, row.logprobs, row.index)
        row.unreported, row.logprobs = 0, None
        reason = row.finish_reason or "error"
        group = row.group
        group.cached_tokens = row.prefix[1] if row.prefix is not None else 0
        step.outputs.extend(group.end(row.index, reason, row.generated, row.error, tail, row.error_code))
        if group.done:
            final = group.final()
            self._forget(row.request_id, final.finish_reason, final.completion_tokens)
        if reason == "error":
            self._fail_rows(step, row.choices, row.error or "another choice failed", row.error_code)

    def _finish_unstarted(
        self, step: _Step, prepared: Prepared, reason: str, error: str | None = None
    ) -> None:
        final = FinalOutput(reason, prepared.prompt_tokens, 0, error)
        step.outputs.append((prepared.request_id, final))
        self._forget(prepared.request_id, reason, 0)

    def _forget(self, request_id: str, reason: str, completion_tokens: int) -> None:
        self.admission.finish(request_id)
        if self._observer is not None:
            self._observer.on_finish(request_id, reason, completion_tokens)

    def _fail_rows(self, step: _Step, rows: Iterable[_Row], message: str, code: str = "internal") -> None:
        for row in rows:
            if row.finish_reason is None:
                row.finish_reason, row.error, row.error_code = "error", message, code
                self._final(step, row)

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish_reason is None]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._batch = kv.select(self._batch, keep) if keep and self._batch is not None else None
        self._sampler_stale = True


def _fork(state: kv.BatchTensors, n: int, slots: bool = False) -> kv.BatchTensors:
    """One prefilled row's state as ``n`` rows (the choices of one request). With ``slots`` the rows are
    views of the one (``kv.repeated``): the join copies each into its slot, the only copy. Otherwise its
    cache is copied row-wise (``kv.take``): the concat batch decodes and extends those rows, and the prefix
    cache may hold the original tensors, which must stay untouched."""
    if n == 1:
        return state
    return kv.repeated(state, n) if slots else kv.take(state, [0] * n)


def _rows_of(prepared: Prepared) -> int:
    """Batch rows a request takes (its ``n`` choices, where the engine supports them)."""
    return int(getattr(prepared, "rows", 1))


def finished_ids(outputs: Sequence[tuple[str, Output]]) -> list[str]:
    """Request ids that end in this step's outputs (a helper for sinks and tests)."""
    return [rid for rid, out in outputs if isinstance(out, FinalOutput)]
