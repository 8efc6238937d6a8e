"""``HFEngine``: the transformers model and processor behind the step-level batching scheduler.

``prepare`` turns a request into processor inputs in a worker thread and resolves its sampling:
request value > environment (``MAX_TOKENS``, ``TEMPERATURE``) > the checkpoint's generation config.
``max_tokens`` given by the request must fit the context with the prompt (else ``PromptTooLong``, as the
OpenAI API does); the default ``MAX_TOKENS`` is shortened to what still fits instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from services.model.engine.base import Admitted, EngineObserver, EngineStats, OutputSink, Prepared
from services.model.engine.batch import bytes_per_token
from services.model.engine.detokenize import TokenTable
from services.model.engine.grammar import Grammars, grammar_param
from services.model.engine.kv_slots import SlotConfig
from services.model.engine.prefix import prompt_key
from services.model.engine.scheduler import Scheduler, SchedulerConfig
from services.model.loading import Loaded
from services.model.multimodal.media_cache import MediaCache
from services.model.settings import ModelSettings
from services.protocol.errors import PromptTooLong
from services.protocol.generate import GenerateRequest, SamplingParams

DEFAULT_EOS = (151645, 151643)


class HFEngine:
    """Implements ``services.model.engine.base.Engine`` for a loaded Qwen3-VL checkpoint."""

    def __init__(
        self, loaded: Loaded, settings: ModelSettings, observer: EngineObserver | None = None
    ) -> None:
        self.model_id = loaded.model_id
        self.max_batch_size = settings.max_batch_size
        self.failure: str | None = None  # an in-thread engine never dies on its own
        self._observer = observer
        self.loaded = loaded
        self.settings = settings
        vocab = loaded.model.get_output_embeddings().weight.shape[0]
        self.table = TokenTable.from_tokenizer(loaded.processor.tokenizer, vocab)
        eos = list(loaded.eos_token_ids or DEFAULT_EOS)
        self.grammars = Grammars(loaded.processor.tokenizer, vocab, eos, settings.grammar_compile_seconds)
        config = SchedulerConfig(
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_step_tokens=settings.max_step_tokens,
            eos_token_ids=frozenset(loaded.eos_token_ids or DEFAULT_EOS),
            prefix_cache=settings.prefix_cache,
            kv_cache_bytes=settings.kv_cache_bytes,
            kv_layout=settings.kv_layout,
            kv_static_shapes=settings.kv_static_shapes,
            cuda_graphs=settings.cuda_graphs,
        )
        self.scheduler_config = config
        # tokens of KV the budget holds (0: no budget): a request's rows must fit it even alone
        self.kv_tokens = settings.kv_cache_bytes // bytes_per_token(loaded.model)
        self._scheduler = Scheduler(loaded.model, self.table, config, observer)
        # what the processor made of each recent image/video, by raw bytes (prepare skips them on a hit)
        self.media_cache = MediaCache(settings.media_cache_bytes)

    def watch(self, on_exit: Callable[[str], None]) -> None:
        """Nothing to watch: the engine lives as long as this process."""

    def start(self, sink: OutputSink) -> None:
        self._scheduler.start(sink)

    async def admit(self, request: GenerateRequest) -> Admitted:
        """The Engine protocol's admit: counted at once, prepared in a worker thread, then queued."""
        self.reserve(request.request_id, request.sampling.n)
        try:
            return await asyncio.to_thread(self.admit_reserved, request)
        except asyncio.CancelledError:  # the caller went away: the request is dropped once it is queued
            self.cancel(request.request_id)
            raise

    def reserve(self, request_id: str, rows: int = 1) -> None:
        """The first half of ``admit``: counted from now on as ``rows`` batch rows (the request's ``n``);
        raises ``NotReady``/``Conflict``/``InvalidValue``/``Overloaded``."""
        self._scheduler.admission.reserve(request_id, rows)

    def admit_reserved(self, request: GenerateRequest) -> Admitted:
        """The blocking second half of ``admit``: prepare and queue a reserved request; on any error it is
        released (its tensors go with the exception)."""
        try:
            prepared = self.prepare_sync(request)
            self._scheduler.admission.enqueue(prepared)
        except BaseException:
            self._scheduler.admission.release(request.request_id)
            raise
        return Admitted(request.request_id, prepared.prompt_tokens)

    async def prepare(self, request: GenerateRequest) -> Prepared:
        """Prepare only (tests, benchmarks): the blocking work in a worker thread; see :meth:`submit`."""
        return await asyncio.to_thread(self.prepare_sync, request)

    def prepare_sync(self, request: GenerateRequest) -> Prepared:
        """The blocking ``prepare`` (any thread; the engine process runs several at once): the request's
        ``Prepared`` (processor inputs, resolved sampling, grammar matchers, prefix key). Afterwards, and
        after a failure too, the observer's ``on_media_cache`` gets a snapshot of the media cache (threads
        may deliver theirs out of order: ``MediaCacheStats.version`` orders them).

        Raises:
            PromptTooLong: the prompt (with ``max_tokens``) passes the context or the KV budget.
            InvalidMedia, InvalidRequest: media or a conversation the service or the processor refuses.
            InvalidSchema, Overloaded: a response format or tool schema that cannot be compiled (or no
                compile slot free).
            MediaRoutingError: the installed transformers bypasses the per-item media path.
        """
        try:
            return self._prepare(request)
        finally:
            on_media = getattr(self._observer, "on_media_cache", None)
            if on_media is not None:
                on_media(self.media_cache.stats())

    def _prepare(self, request: GenerateRequest) -> Prepared:
        """The blocking part of :meth:`prepare` (media decoding, template, processor, limits); media seen
        recently come from the processed-media cache (``multimodal/media_cache.py``, MEDIA_CACHE_BYTES)."""
        from services.model.multimodal.prompt import MediaLimits, prepare_prompt
        from services.model.multimodal.text_bound import check_prompt_text

        # Cheap first: a prompt far over the context is refused before media decoding and tokenization.
        context, max_tokens = self.loaded.context_length, request.sampling.max_tokens
        check_prompt_text(
            self.loaded.processor.tokenizer, request.messages, context, max_tokens, request.tools
        )
        # then the grammar (bounded, off the decode loop, one matcher per choice): before any media work
        grammar = self.grammars.matchers(request)
        limits = MediaLimits.from_settings(self.settings)
        prompt = prepare_prompt(
            self.loaded.processor, request.messages, limits, request.tools, request.media, self.media_cache
        )
        inputs = prompt.inputs
        prompt_tokens = int(inputs["input_ids"].shape[1])
        sampling = resolve_sampling(request.sampling, self.settings, self.loaded, prompt_tokens)
        sampling = fit_kv_budget(
            sampling,
            request.sampling.max_tokens is None,
            prompt_tokens,
            self.kv_tokens,
            self._scheduler.slot_config,
        )
        return Prepared(
            request_id=request.request_id,
            sampling=sampling,
            prompt_tokens=prompt_tokens,
            inputs=inputs,
            grammar=grammar,
            grammar_param=grammar_param(request),
            prefix_key=(
                prompt_key(self.loaded.model.config, inputs, prompt.digests)
                if self.settings.prefix_cache
                else None
            ),
        )

    def submit(self, prepared: Prepared) -> None:
        """Queue a prepared request (tests, benchmarks): reserve and enqueue in one."""
        self._scheduler.submit(prepared)

    def cancel(self, request_id: str) -> bool:
        return self._scheduler.cancel(request_id)

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    def shutdown(self, grace_seconds: float) -> None:
        self._scheduler.shutdown(grace_seconds)
        self.grammars.close()


def resolve_sampling(
    requested: SamplingParams, settings: ModelSettings, loaded: Any, prompt_tokens: int
) -> SamplingParams:
    """Fill every ``None`` of the request from the environment, then the checkpoint's defaults."""
    defaults = loaded.sampling
    temperature = requested.temperature
    if temperature is None:
        temperature = settings.temperature
    if temperature is None:
        temperature = defaults.temperature if defaults.do_sample else 0.0
    return requested.model_copy(
        update={
            "max_tokens": _max_tokens(requested.max_tokens, settings.max_tokens, loaded, prompt_tokens),
            "temperature": temperature,
            "top_p": requested.top_p if requested.top_p is not None else defaults.top_p,
            "top_k": requested.top_k if requested.top_k is not None else defaults.top_k,
            "repetition_penalty": (
                requested.repetition_penalty
                if requested.repetition_penalty is not None
                else defaults.repetition_penalty
            ),
        }
    )


def _max_tokens(requested: int | None, default: int, loaded: Any, prompt_tokens: int) -> int:
    room = int(loaded.context_length) - prompt_tokens
    if requested is not None and requested > room:
        raise PromptTooLong(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({requested}) exceeds the model's "
            f"context of {loaded.context_length} tokens"
        )
    if room < 1:
        raise PromptTooLong(
            f"the prompt ({prompt_tokens} tokens) leaves no room in the model's context of "
            f"{loaded.context_length} tokens"
        )
    return requested if requested is not None else min(default, room)


def fit_kv_budget(
    sampling: SamplingParams,
    defaulted: bool,
    prompt_tokens: int,
    kv_tokens: int,
    slot_config: SlotConfig | None = None,
) -> SamplingParams:
    """``sampling`` whose rows (prompt + ``max_tokens`` each, ``n`` of them) fit ``kv_tokens`` of KV cache
    even alone, in the rectangle the layout gives them: ``n`` rows (concat), or ``slot_config.alone_rows(n)``
    slots (``KV_LAYOUT=slots``: ``n`` too under a budget, where the slot count falls back from the bucket
    to the rows when the bucket's S x C would not fit; the bucket without one). A defaulted ``max_tokens``
    is shortened to what fits; a requested one that does not fit, or a prompt that leaves no room, raises
    ``PromptTooLong`` (400). ``kv_tokens`` 0: no budget."""
    if not kv_tokens:
        return sampling
    choices = int(getattr(sampling, "n", 1) or 1)
    rows = choices if slot_config is None else slot_config.alone_rows(choices)
    room = kv_tokens // rows - prompt_tokens
    max_tokens = sampling.max_tokens or 1
    if room >= max_tokens:
        return sampling
    if room < 1 or not defaulted:
        held = "" if rows == choices else f", which occupy a bucket of {rows} slot(s) (KV_LAYOUT=slots)"
        raise PromptTooLong(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) for {choices} choice(s)"
            f"{held} needs more KV cache than the service holds ({kv_tokens} tokens in all, KV_CACHE_BYTES)"
        )
    return sampling.model_copy(update={"max_tokens": room})
