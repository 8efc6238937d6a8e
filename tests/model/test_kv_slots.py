"""KV_LAYOUT=slots (kv_slots.SlotBatch): rows keep their KV in place while others join and leave.

The oracle is greedy (and seeded) equality: the slots layout decodes exactly the tokens of the concatenating
layout and of ``generate`` alone, with text, image and video rows joining and leaving in several orders, holes
refilled, the slot bucket and the column capacity grown, n > 1 forks and a step that failed half-way undone.
Besides: a join that fits and a leave move no running row's KV, and a decode step reads nothing back from the
device.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from services.model.engine import batch as kv
from services.model.engine import kv_slots
from services.model.engine.kv_slots import SlotBatch, SlotConfig, columns_for, slot_bucket, slot_buckets
from services.model.metrics import ModelMetrics
from tests.model.engine_support import (
    Recorder,
    RecordingScheduler,
    drain,
    prepare,
    reference_tokens,
    request,
    scheduler_for,
    tiny_engine,
)

pytestmark = pytest.mark.slow

_PROMPTS = ("Tell me a story.", "List the planets in order please.", "Why is the sky blue?", "A haiku")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


def _prefill(engine: Any, text: str) -> kv.BatchTensors:
    ids = engine.loaded.processor.tokenizer(text, return_tensors="pt")["input_ids"]
    return kv.prefill(engine.loaded.model, {"input_ids": ids}, torch.device("cpu"))[1]


def test_slot_buckets_and_column_blocks() -> None:
    assert slot_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert slot_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert slot_buckets(1) == [1]
    assert [slot_bucket(n, 64) for n in (0, 1, 3, 9, 17, 25, 33, 49)] == [0, 1, 4, 16, 24, 32, 48, 64]
    with pytest.raises(ValueError):
        slot_bucket(65, 64)
    assert [columns_for(n) for n in (1, 128, 129)] == [128, 128, 256]
    assert columns_for(30, cap=40) == 40  # a small KV budget caps the block at the slot's share
    assert columns_for(50, cap=40) == 50  # a need past the share (the request was sized to fit alone)
    assert columns_for(30, cap=500) == 128
    assert columns_for(5, block=8) == 8


# ---- the batch functions, both layouts side by side -----------------------------------------------------


@contextmanager
def _failing_layer(model: Any, layer: int) -> Iterator[None]:
    """The decoder layer ``layer`` raises once it runs (earlier layers have written their column)."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected fault")

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(boom)
    try:
        yield
    finally:
        handle.remove()


def _churn(engine: Any, slots: SlotConfig | None, watch: Callable[[kv.Batch], None]) -> list[list[int]]:
    """A fixed script of joins and leaves over 36 greedy steps; the tokens of every step (row order)."""
    model = engine.loaded.model
    batch = kv.merge([_prefill(engine, p * (1 + i % 3)) for i, p in enumerate(_PROMPTS)], slots)
    script: dict[int, Callable[[kv.Batch], kv.Batch]] = {
        3: lambda b: _leave(b, [0, 2]),  # two rows leave from the middle
        5: lambda b: kv.merge([b, _prefill(engine, _PROMPTS[1]), _prefill(engine, _PROMPTS[2] * 2)], slots),
        9: lambda b: kv.merge(
            [b, *(_prefill(engine, p) for p in _PROMPTS), _prefill(engine, "x " * 40)], slots
        ),
        14: lambda b: _leave(b, [i for i in range(b.size) if i % 3 != 1]),
        17: lambda b: kv.merge([b, kv.take(_prefill(engine, _PROMPTS[3]), [0, 0])], slots),  # a fork of 2
        24: lambda b: _leave(b, [b.size - 1, 0]),  # few rows left, in a new order
    }
    tokens: list[list[int]] = []
    for step in range(36):
        if step in script:
            batch = script[step](batch)
        if step == 7:  # a step that fails half-way through the layers, undone, then run again
            saved = kv.snapshot(batch)
            with _failing_layer(model, 1), pytest.raises(RuntimeError, match="injected"):
                kv.decode(model, batch)
            kv.restore(batch, saved)
        logits = kv.decode(model, batch, out=torch.empty((batch.size, logits_width(model))))
        batch.tokens = logits.argmax(-1, keepdim=True)
        tokens.append(batch.tokens.flatten().tolist())
        watch(batch)
    return tokens


def _leave(batch: kv.Batch, keep: list[int]) -> kv.Batch:
    """Rows leave, then the batch settles (as the scheduler's next step does when nobody joins)."""
    batch = kv.select(batch, keep)
    kv.settle(batch)
    return batch


def logits_width(model: Any) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _churn_like_concat(engine: Any, slots: SlotConfig) -> list[tuple[int, int]]:
    """The churn script in slots decodes exactly concat's tokens; returns the buffers' (S, C) at each step."""
    shapes: list[tuple[int, int]] = []

    def watch(batch: kv.Batch) -> None:
        assert isinstance(batch, SlotBatch)
        shapes.append(batch.capacity)

    with torch.inference_mode():
        concat = _churn(engine, None, lambda b: None)
        assert _churn(engine, slots, watch) == concat
    assert len({t for step in concat for t in step}) > 10  # the model's output depends on its input
    return shapes


@pytest.mark.parametrize("static", [False, True], ids=["span", "static"])
def test_slots_decode_the_tokens_of_concat_through_joins_leaves_and_grows(engine: Any, static: bool) -> None:
    shapes = _churn_like_concat(engine, SlotConfig(16, block=16, static=static))
    slot_counts = [s for i, (s, _) in enumerate(shapes) if i == 0 or shapes[i - 1][0] != s]
    # grown by joins; compacted when the rows left + 1 fit a bucket at most half of S (9 -> 6 rows: 8 of 16,
    # 8 -> 2: 4 of 8), not for 4 -> 2 rows (3 need the bucket of 4 they are in)
    assert slot_counts == [4, 16, 8, 4]
    columns = [c for _, c in shapes]
    assert any(b > a for a, b in pairwise(columns))  # grown by blocks
    assert any(b < a for a, b in pairwise(columns))  # shrunk by the compaction


def test_a_join_that_fits_and_a_leave_move_no_running_row(engine: Any) -> None:
    with torch.inference_mode():
        batch = kv.merge([_prefill(engine, p) for p in _PROMPTS], SlotConfig(8))
        assert isinstance(batch, SlotBatch) and batch.capacity == (4, 128)
        kv.decode(engine.loaded.model, batch)
        pointers = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in batch.cache.layers]
        kept = {batch.slots[i]: _row_copy(batch, i) for i in (0, 2, 3)}
        nbytes = kv.nbytes(batch)

        batch = kv.select(batch, [0, 2, 3])  # the row of slot 1 leaves; 3 rows still need a bucket of 4
        assert batch.slots == [0, 2, 3]
        assert _pointers(batch) == pointers and kv.nbytes(batch) == nbytes
        _assert_rows(batch, kept)

        batch = kv.merge([batch, _prefill(engine, _PROMPTS[1])])  # fills the hole
        assert batch.slots == [0, 2, 3, 1]
        assert _pointers(batch) == pointers and kv.nbytes(batch) == nbytes
        _assert_rows(batch, kept)
        assert batch.lengths()[3] == _prefill(engine, _PROMPTS[1]).mask.shape[1]

        batch = kv.merge([batch, _prefill(engine, "one more"), _prefill(engine, "and another")])
        assert batch.capacity == (8, 128) and _pointers(batch) != pointers  # a bucket grow moves once
        _assert_rows(batch, kept)


def _pointers(batch: SlotBatch) -> list[tuple[int, int]]:
    return [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in batch.cache.layers]


def _row_copy(batch: SlotBatch, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.clone(), v.clone()) for k, v in batch.row_kv(row)[0]]


def _assert_rows(batch: SlotBatch, kept: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
    for slot, layers in kept.items():
        now = batch.row_kv(batch.slots.index(slot))[0]
        for (k, v), (k0, v0) in zip(now, layers, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)


_SYNCS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__index__", "__float__")


def test_a_decode_step_reads_nothing_back_from_the_device(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way a tensor's value reaches Python (a device -> host sync on CUDA) raises inside the step."""
    with torch.inference_mode():
        batch = kv.merge([_prefill(engine, p) for p in _PROMPTS], SlotConfig(8))
        batch = kv.select(batch, [0, 3])
        out = torch.empty((batch.size, logits_width(engine.loaded.model)))
        kv.decode(engine.loaded.model, batch, out=out)  # warm: the first step picks the mask kind

        def synced(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("host sync inside the decode step")

        with monkeypatch.context() as m:
            for name in _SYNCS:
                m.setattr(torch.Tensor, name, synced)
            kv.decode(engine.loaded.model, batch, out=out)
        assert batch.lengths() == [n + 2 for n in (_prefill(engine, p).mask.shape[1] for p in _PROMPTS[::3])]


# ---- the scheduler ---------------------------------------------------------------------------------------


def _schedule(
    engine: Any, arrivals: list[tuple[int, Any]], observer: Any = None, **config: Any
) -> tuple[RecordingScheduler, Recorder]:
    """Submit each prepared request at its step (0-based), drive the scheduler until idle."""
    base = scheduler_for(engine, **config)
    sched = RecordingScheduler(engine.loaded.model, engine.table, base._config, observer)
    rec = Recorder()
    sched.bind(rec)
    step = 0
    pending = sorted(arrivals, key=lambda a: a[0])
    while pending or sched.admission.has_work():
        while pending and pending[0][0] <= step:
            sched.submit(pending.pop(0)[1])
        if sched.admission.has_work():
            sched.step_once()
        step += 1
    drain(sched)
    return sched, rec


@pytest.fixture(scope="module")
def media(engine: Any) -> dict[str, Any]:
    reqs = [
        request("video", "Describe the video", video=4, max_tokens=14, temperature=0),
        request("text-1", "Why do cats purr so loudly at night?", max_tokens=20, temperature=0),
        request("image", "What is in the image?", image=5, max_tokens=16, temperature=0),
        request("text-2", "hi", max_tokens=9, temperature=0),
        request("text-3", "Name three rivers in Europe, please", max_tokens=18, temperature=0),
        request("image-2", "And this picture?", image=6, max_tokens=12, temperature=0),
    ]
    return {r.request_id: prepare(engine, r) for r in reqs}


@pytest.mark.parametrize("static", [False, True], ids=["span", "static"])
def test_scheduler_rows_equal_generate_alone_in_other_orders(
    engine: Any, media: dict[str, Any], static: bool
) -> None:
    """Video first, text joining, the short text leaving from the middle, image rows filling its hole;
    three slots at most so that rows wait and reuse freed slots."""
    arrivals = [(0, media["video"]), (2, media["text-1"]), (2, media["text-2"]), (5, media["image"])]
    arrivals += [(6, media["text-3"]), (9, media["image-2"])]
    sched, rec = _schedule(engine, arrivals, kv_layout="slots", kv_static_shapes=static, max_batch_size=3)
    for rid, prepared in media.items():
        assert sched.tokens[rid] == reference_tokens(engine, prepared), rid
        assert rec.final(rid).finish_reason in ("stop", "length"), rid  # type: ignore[union-attr]
    assert sched._batch is None  # idle: the slot buffers are gone


def test_forks_and_seeded_sampling_equal_across_layouts(engine: Any) -> None:
    seeded = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    reqs = [
        request("fork-greedy", "What is in the image?", image=7, n=2, max_tokens=10, temperature=0),
        request("fork-seeded", "Tell me a story", n=3, seed=99, max_tokens=12, **seeded),
        request("seeded", "Count the stars", seed=5, max_tokens=15, **seeded),
    ]
    prepared = [(i * 2, prepare(engine, r)) for i, r in enumerate(reqs)]
    runs = {layout: _schedule(engine, prepared, kv_layout=layout)[0] for layout in ("concat", "slots")}
    assert runs["slots"].by_choice == runs["concat"].by_choice
    assert len(runs["slots"].by_choice) == 6
    greedy = reference_tokens(engine, prepared[0][1])
    assert (
        runs["slots"].by_choice[("fork-greedy", 0)] == runs["slots"].by_choice[("fork-greedy", 1)] == greedy
    )
    assert len({tuple(runs["slots"].by_choice[("fork-seeded", i)]) for i in range(3)}) == 3


def test_an_n_choice_prompt_reaches_its_slots_in_one_copy(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork into n rows is views (``kv.repeated``): no row copy before the join copies into the slots.
    The prompt kept in the prefix cache stays intact: the same prompt again, reusing it, decodes the same."""
    copies: list[list[int]] = []
    real_take = kv.take
    monkeypatch.setattr(kv, "take", lambda batch, rows: copies.append(rows) or real_take(batch, rows))
    ask = "Tell me a story about a lighthouse keeper and the sea"
    first = prepare(engine, request("fork", ask, n=3, max_tokens=6, temperature=0))
    again = prepare(engine, request("again", ask, n=2, max_tokens=6, temperature=0))
    sched, _ = _schedule(engine, [(0, first), (12, again)], kv_layout="slots")
    assert copies == []
    assert sched.prefix is not None and sched.prefix.stats.hits >= 1
    chosen = {key: tokens for key, tokens in sched.by_choice.items()}
    assert len(chosen) == 5 and len({tuple(t) for t in chosen.values()}) == 1  # greedy: every choice alike
    _schedule(engine, [(0, first)], kv_layout="concat")
    assert copies == [[0, 0, 0]]  # concat still copies the row (its batch extends those tensors)


def test_repeated_rows_share_the_one_row_s_memory() -> None:
    state = _Rows(5)  # any one-row state
    state.next_pos = torch.tensor([5])
    rows = kv.repeated(state, 4)  # type: ignore[arg-type]
    assert rows.size == 4 and rows.cache.layers[0].keys.shape[0] == 4
    assert rows.cache.layers[0].keys.data_ptr() == state.cache.layers[0].keys.data_ptr()
    assert state.cache.layers[0].keys.shape[0] == 1  # the original cache object is untouched
    with pytest.raises(ValueError, match="one row"):
        kv.repeated(rows, 2)


def test_the_reservation_covers_the_slot_buffers(engine: Any) -> None:
    """Under a KV budget, the rows' reservation (what admission checks) is never below the buffers'
    allocation, and it is the S x C rectangle: slots in buckets, columns in whole blocks."""
    per_token = kv.bytes_per_token(engine.loaded.model)
    sched = scheduler_for(engine, kv_layout="slots", kv_cache_bytes=per_token * 4096, prefix_cache=False)
    rec = Recorder()
    sched.bind(rec)
    reqs = [prepare(engine, request(f"r{i}", "word " * (3 * i + 1), max_tokens=8 + 40 * i)) for i in range(3)]
    for p in reqs:
        sched.submit(p)
    seen = []
    while sched.step_once():
        batch, (reserved, _, _) = sched._batch, sched.kv_bytes()
        if isinstance(batch, SlotBatch):
            assert kv.nbytes(batch) <= reserved
            seen.append(reserved)
    longest = max(p.prompt_tokens + (p.sampling.max_tokens or 0) for p in reqs)
    assert seen[0] == 4 * columns_for(longest) * per_token  # three rows: a bucket of 4 slots


def test_the_settings_reach_the_scheduler(engine: Any) -> None:
    from services.model.engine.hf import HFEngine

    update = {"kv_layout": "slots", "kv_static_shapes": True, "cuda_graphs": True}
    config = HFEngine(engine.loaded, engine.settings.model_copy(update=update)).scheduler_config
    assert (config.kv_layout, config.kv_static_shapes, config.cuda_graphs) == ("slots", True, True)


# ---- review findings: stale KV, memory following the rows down, transient memory, devices, attention ------


def test_a_freed_slot_s_stale_non_finite_kv_does_not_reach_its_next_row(engine: Any) -> None:
    """A row whose KV went non-finite (bf16 overflow on a GPU) leaves; a shorter newcomer takes its slot.
    Masked columns still enter attention's products (0 x NaN = NaN), so the join must clear them."""
    model = engine.loaded.model
    prompts = ("Why?", "a long prompt " * 20, "hi")

    def run(slots: SlotConfig | None, poison: bool) -> torch.Tensor:
        batch = kv.merge([_prefill(engine, p) for p in prompts[:2]], slots)
        kv.decode(model, batch)
        if poison:
            assert isinstance(batch, SlotBatch)
            for layer in batch.cache.layers:
                layer.keys[batch.slots[1]].fill_(float("nan"))
                layer.values[batch.slots[1]].fill_(float("inf"))
        batch = kv.merge([kv.select(batch, [0]), _prefill(engine, prompts[2])], slots)
        if poison:
            assert isinstance(batch, SlotBatch) and batch.slots == [0, 1]  # the newcomer took the slot
        return kv.decode(model, batch)

    with torch.inference_mode():
        slots, concat = run(SlotConfig(4), poison=True), run(None, poison=False)
    assert torch.isfinite(slots).all()
    assert torch.equal(slots.argmax(-1), concat.argmax(-1))
    torch.testing.assert_close(slots, concat)


def test_slot_memory_follows_the_rows_down_when_a_long_row_leaves(engine: Any) -> None:
    """16 rows, one long: the long row leaving shrinks the columns, fewer rows a smaller bucket; the rows
    left decode the tokens of concat."""
    model = engine.loaded.model
    texts = ["word " * 300] + [f"short {i}" for i in range(15)]

    def run(slots: SlotConfig | None, watch: Callable[[kv.Batch], None]) -> list[list[int]]:
        batch = kv.merge([_prefill(engine, t) for t in texts], slots)
        tokens = []
        for step in range(6):
            if step == 2:
                batch = _leave(batch, list(range(1, 16)))  # the long row leaves
            if step == 4:
                batch = _leave(batch, [0, 4, 8, 12, 14])  # spread slots: 5 rows
            logits = kv.decode(model, batch)
            batch.tokens = logits.argmax(-1, keepdim=True)
            tokens.append(batch.tokens.flatten().tolist())
            watch(batch)
        return tokens

    shapes: list[tuple[int, int]] = []
    with torch.inference_mode():
        concat = run(None, lambda b: None)
        slots = run(SlotConfig(16), lambda b: shapes.append(b.capacity))  # type: ignore[union-attr]
    assert slots == concat
    assert shapes[:2] == [(16, 384)] * 2
    assert shapes[2:4] == [(16, 128)] * 2  # 15 short rows: the long row's columns are gone
    assert shapes[4:] == [(8, 128)] * 2  # 5 rows fit the bucket of 8, in its lowest slots


def test_a_reallocation_releases_each_old_layer_after_copying_it(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the buffers grow, each layer's old keys and values are gone before the next layer's new ones
    are made: the transient extra memory is one layer, not a second copy of the cache."""
    with torch.inference_mode():
        batch = kv.merge([_prefill(engine, p) for p in _PROMPTS[:3]], SlotConfig(8))
        assert isinstance(batch, SlotBatch) and batch.capacity[0] == 4
        old = [weakref.ref(t) for layer in batch.cache.layers for t in (layer.keys, layer.values)]
        alive: list[int] = []
        made = SlotBatch._buffer

        def counting(self: SlotBatch, *args: Any) -> torch.Tensor:
            alive.append(sum(ref() is not None for ref in old))
            return made(self, *args)

        monkeypatch.setattr(SlotBatch, "_buffer", counting)
        batch = kv.merge([batch, *(_prefill(engine, p) for p in ("one", "two"))])
    layers = len(old) // 2
    assert batch.capacity[0] == 8
    assert alive == [2 * (layers - i // 2) for i in range(2 * layers)]


def test_each_layer_s_buffers_live_on_that_layer_s_device(engine: Any) -> None:
    """A device_map may split the layers: the slot buffers follow each layer's own device (here the
    ``meta`` device stands in for a second accelerator)."""
    part = _prefill(engine, _PROMPTS[0])
    second = part.cache.layers[1]
    second.keys, second.values = second.keys.to("meta"), second.values.to("meta")
    with torch.inference_mode():
        batch = kv.merge([part], SlotConfig(4))
    assert isinstance(batch, SlotBatch)
    devices = [layer.keys.device.type for layer in batch.cache.layers]
    assert devices[1] == "meta" and devices.count("cpu") == len(devices) - 1
    assert batch.cache.layers[1].values.device.type == "meta"


def test_the_scheduler_refuses_slots_with_an_attention_it_cannot_serve(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = engine.loaded.model.config.get_text_config(decoder=True)
    monkeypatch.setattr(text, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match=r"KV_LAYOUT=slots.*'flash_attention_2'"):
        scheduler_for(engine, kv_layout="slots")
    scheduler_for(engine, kv_layout="concat")  # concat does not care


def test_static_shapes_with_concat_warn_at_start(engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        scheduler_for(engine, kv_layout="concat", kv_static_shapes=True)
    assert "KV_STATIC_SHAPES=true has no effect with KV_LAYOUT=concat" in caplog.text


def test_cuda_graphs_without_slots_static_shapes_and_cuda_warn_at_start(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"):
        sched = scheduler_for(engine, kv_layout="slots", kv_static_shapes=True, cuda_graphs=True)
    assert "CUDA_GRAPHS=true has no effect here" in caplog.text and "devices cpu" in caplog.text
    assert sched.slot_config is not None and not sched.slot_config.graphs


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _ForwardInputs(TorchDispatchMode):
    """The storages a forward reads that none of its own ops made: its inputs (the parameters, the slot
    buffers, the lengths, deltas, step tokens, column ids). Kept alive, so no address is reused meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.made: set[int] = set()
        self.read: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self.made:
                self.read[_storage(t)] = t
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self.read:
                self.made.add(_storage(t))
        return out


class _AddressCheckedReplay:
    """Stands in for ``torch.cuda.CUDAGraph`` on CPU. A real graph replays the addresses it recorded; this
    replay runs the forward again and fails when that reads a storage the capture did not (on CUDA the graph
    would have read the stale one), then writes the result where the capture's output lives."""

    def __init__(self, forward: Callable[[], torch.Tensor], out: torch.Tensor, inputs: set[int]) -> None:
        self.forward, self.out, self.inputs, self.replays = forward, out, inputs, 0

    def replay(self) -> None:
        self.replays += 1
        with _ForwardInputs() as now:
            result = self.forward()
        assert set(now.read) == self.inputs, "the replay reads storages the capture did not record"
        self.out.copy_(result)


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every capture's stand-in graph, with the (hi, width) it was captured at."""
    made: list[Any] = []

    def capture(shape: tuple[int, int], forward: Callable[[], torch.Tensor], device: Any) -> Any:
        forward()  # the side-stream warm-up: a harmless second write of the same columns
        with _ForwardInputs() as inputs:
            out = forward()
        graph = _AddressCheckedReplay(forward, out.clone(), set(inputs.read))
        made.append((shape, graph, inputs))  # the inputs' tensors stay alive with it
        return kv_slots._DecodeGraph(graph, graph.out, shape, device)

    monkeypatch.setattr(kv_slots._DecodeGraph, "capture", staticmethod(capture))
    return made


def test_cuda_graphs_decode_the_tokens_of_concat_and_capture_once_per_buffer_shape(
    engine: Any, captures: list[Any]
) -> None:
    """The replayed forward reads its inputs where they were captured: joins, leaves, forks, a failed
    step and the lengths all reach it in place; a reallocation (new S or C) captures anew."""
    config = SlotConfig(16, block=16, static=True, graphs=True)
    shapes = _churn_like_concat(engine, config)
    changes = [shape for i, shape in enumerate(shapes) if i == 0 or shapes[i - 1] != shape]
    # one capture per run of steps at one buffer shape; every other step replays
    assert [shape for shape, _, _ in captures] == changes
    assert sum(graph.replays for _, graph, _ in captures) == 36 + 1  # + the step that failed half-way
    # the counts the metrics report: every step graphed (the one that failed in a layer before its count)
    counts = config.graph_counts
    assert (counts.graph_captures, counts.graphed_steps, counts.eager_steps) == (len(changes), 36, 0)
    assert counts.graph_capture_failures == 0


def _restore_rebinding(self: SlotBatch, saved: Any) -> None:
    lengths, tensor = saved
    self._lengths = list(lengths)
    self._length_t = tensor.clone()  # a new tensor where the graph recorded the old one


@pytest.mark.parametrize("regression", ["restore", "select"])
def test_the_stand_in_catches_a_rebound_graph_input(
    engine: Any, captures: list[Any], monkeypatch: pytest.MonkeyPatch, regression: str
) -> None:
    """The check above is only as good as its stand-in: a state change that rebinds an input the graph
    reads (instead of writing it in place) must fail it."""
    if regression == "restore":
        monkeypatch.setattr(SlotBatch, "restore", _restore_rebinding)
    else:
        select = SlotBatch.select

        def select_rebinding(self: SlotBatch, keep: Any) -> SlotBatch:
            out = select(self, keep)
            self._delta_t = self._delta_t.clone()
            return out

        monkeypatch.setattr(SlotBatch, "select", select_rebinding)
    with torch.inference_mode(), pytest.raises(AssertionError, match="storages the capture did not"):
        _churn(engine, SlotConfig(16, block=16, static=True, graphs=True), lambda b: None)


def test_cuda_graphs_through_the_scheduler_decode_what_generate_does(
    engine: Any, media: dict[str, Any], captures: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs forced on (the scheduler enables them on CUDA only): media rows joining and leaving three
    slots, a prompt prefilled in chunks and an n = 2 fork decode what each decodes alone."""
    from services.model.engine.scheduler import Scheduler

    configure = Scheduler._configure_slots
    forced = lambda self, model: dataclasses.replace(configure(self, model), graphs=True)  # noqa: E731
    monkeypatch.setattr(Scheduler, "_configure_slots", forced)
    ask = "Name three rivers in Europe, please"
    fork = prepare(engine, request("fork", ask, n=2, max_tokens=10, temperature=0))
    order = [(0, "video"), (2, "text-1"), (2, "text-2"), (5, "image"), (6, "text-3")]
    arrivals = [(step, media[rid]) for step, rid in order] + [(9, fork)]
    config = {"kv_layout": "slots", "kv_static_shapes": True, "max_batch_size": 3, "max_step_tokens": 32}
    assert media["video"].prompt_tokens > 32  # prefilled in pieces
    observer = ModelMetrics()
    sched, _ = _schedule(engine, arrivals, observer=observer, **config)
    assert captures and sum(graph.replays for _, graph, _ in captures) > len(captures)
    counted = _graph_samples(observer)
    assert counted["captured"] == len(captures) and counted["failed"] == counted["eager"] == 0
    assert counted["graphed"] == sum(graph.replays for _, graph, _ in captures)
    for _, rid in order:
        assert sched.tokens[rid] == reference_tokens(engine, media[rid]), rid
    for i in range(2):
        assert sched.by_choice[("fork", i)] == reference_tokens(engine, fork), i


def test_captures_and_replays_go_to_the_model_s_cuda_device() -> None:
    """A model on cuda:1 while the thread's current device is 0: without switching, the capture would
    record nothing (its work runs on another device's stream) and every replay would do nothing."""
    on = kv_slots._on(torch.device("cuda:1"))
    assert isinstance(on, torch.cuda.device) and on.idx == 1
    assert not isinstance(kv_slots._on(torch.device("cpu")), torch.cuda.device)
    with pytest.raises(RuntimeError, match="graph is empty"):
        kv_slots._reraise_warnings([_warning("The CUDA Graph is empty. This usually means ...")])
    with pytest.warns(UserWarning, match="something else"):
        kv_slots._reraise_warnings([_warning("something else")])


def _warning(text: str) -> Any:
    import warnings

    return warnings.WarningMessage(UserWarning(text), UserWarning, __file__, 1)


def test_a_failed_capture_falls_back_to_eager_decoding(
    engine: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def capture(shape: tuple[int, int], forward: Callable[[], torch.Tensor], device: Any) -> Any:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(kv_slots._DecodeGraph, "capture", staticmethod(capture))
    monkeypatch.setattr(kv_slots._DecodeGraph, "failed", False)  # the process-wide switch, restored after
    first, later = (SlotConfig(16, block=16, static=True, graphs=True) for _ in range(2))
    with torch.inference_mode(), caplog.at_level("ERROR"):
        concat = _churn(engine, None, lambda b: None)
        graphed = _churn(engine, first, lambda b: None)
        again = _churn(engine, later, lambda b: None)
    assert graphed == concat == again
    # once per process: a later batch does not try (and log) again
    assert caplog.text.count("capturing the decode step as a CUDA graph failed") == 1
    # and the metrics see it: every step eager (the one that failed in a layer before its count)
    assert (first.graph_counts.graph_capture_failures, first.graph_counts.eager_steps) == (1, 36)
    assert (later.graph_counts.graph_capture_failures, later.graph_counts.eager_steps) == (0, 36)
    assert first.graph_counts.graphed_steps == later.graph_counts.graphed_steps == 0


def test_out_of_memory_while_capturing_turns_graphs_off_for_that_batch_only(
    engine: Any, monkeypatch: pytest.MonkeyPatch, captures: list[Any]
) -> None:
    """The first capture runs out of memory: that batch decodes eagerly, counted as such; the next batch
    captures again (the process-wide switch stays on)."""
    stand_in = kv_slots._DecodeGraph.capture
    calls: list[int] = []

    def capture(shape: tuple[int, int], forward: Callable[[], torch.Tensor], device: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return stand_in(shape, forward, device)

    monkeypatch.setattr(kv_slots._DecodeGraph, "capture", staticmethod(capture))
    monkeypatch.setattr(kv_slots._DecodeGraph, "failed", False)
    first, later = (SlotConfig(16, block=16, static=True, graphs=True) for _ in range(2))
    with torch.inference_mode():
        assert _churn(engine, first, lambda b: None) == _churn(engine, later, lambda b: None)
    assert (first.graph_counts.graph_capture_failures, first.graph_counts.eager_steps) == (1, 36)
    assert first.graph_counts.graph_captures == first.graph_counts.graphed_steps == 0
    assert later.graph_counts.graph_captures == len(captures) > 0 and later.graph_counts.graphed_steps == 36
    assert not kv_slots._DecodeGraph.failed


def _graph_samples(metrics: Any) -> dict[str, float]:
    """The CUDA-graph counters of a ``ModelMetrics`` page by their label value (mode or outcome)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        next(iter(s.labels.values())): s.value
        for family in text_string_to_metric_families(metrics.render(None).decode())
        for s in family.samples
        if s.name in ("model_cuda_graph_decode_steps_total", "model_cuda_graph_captures_total")
    }


# ---- second review: hysteresis, bursts, zeroing, the gather, failed reallocations --------------------------

_LAYERS, _HEADS, _DIM = 2, 1, 4


class _Rows:
    """A prefilled part without a model (``kv_slots.RowsState``): ``rows`` rows of ``length`` tokens whose
    keys and values are all ``fill``."""

    def __init__(self, length: int, rows: int = 1, fill: float = 1.0) -> None:
        shape = (rows, _HEADS, length, _DIM)

        class _Layer:
            keys = torch.full(shape, fill)
            values = torch.full(shape, fill)

        self.cache = type("Cache", (), {"layers": [_Layer() for _ in range(_LAYERS)]})()
        self.mask = torch.ones((rows, length), dtype=torch.long)
        self.delta = torch.zeros(rows, dtype=torch.long)
        self.tokens = torch.zeros((rows, 1), dtype=torch.long)


def _empty(config: SlotConfig) -> SlotBatch:
    return SlotBatch(config, _LAYERS, _HEADS, _DIM, torch.float32, torch.device("cpu"))


@pytest.fixture
def reallocations(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (S, C) of every buffer a ``SlotBatch`` makes (a reallocation makes one keys and one values
    buffer per layer: see :func:`_count`)."""
    shapes: list[tuple[int, int]] = []
    made = SlotBatch._buffer

    def counting(self: SlotBatch, slots: int, columns: int, device: Any) -> torch.Tensor:
        shapes.append((slots, columns))
        return made(self, slots, columns, device)

    monkeypatch.setattr(SlotBatch, "_buffer", counting)
    return shapes


def _count(shapes: list[tuple[int, int]], layers: int = _LAYERS) -> list[tuple[int, int]]:
    """One (S, C) per reallocation of ``reallocations``."""
    return shapes[:: 2 * layers]


@pytest.mark.parametrize(("max_slots", "rows"), [(24, 17), (16, 9), (8, 5), (4, 3), (2, 2)])
def test_rows_leaving_and_joining_at_a_bucket_edge_copy_no_kv(
    reallocations: list[tuple[int, int]], max_slots: int, rows: int
) -> None:
    """17 <-> 16 rows (and 9 <-> 8, ...): a leave, the batch settling, then a join, over and over. Without
    hysteresis each crossing compacted into the smaller bucket and the join grew it back: two copies of
    the cache per cycle."""
    batch = kv.merge([_Rows(20) for _ in range(rows)], SlotConfig(max_slots))
    assert isinstance(batch, SlotBatch)
    grown = len(_count(reallocations))
    for _ in range(4):
        batch = kv.select(batch, list(range(1, batch.size)))
        kv.settle(batch)
        batch = kv.merge([batch, _Rows(20)])
    assert len(_count(reallocations)) == grown and batch.size == rows


def test_a_binding_budget_falls_back_from_the_bucket_to_the_rows() -> None:
    """Bucket when bucket x longest fits the budget (or no budget), else the rows rounded up to a multiple of
    4 when that fits, else the rows exactly; never fewer than the rows."""
    free, tight = SlotConfig(16), SlotConfig(16, budget_tokens=1000)
    assert [free.slots_for(r, 500) for r in (1, 5, 9)] == [1, 8, 16]  # no budget: the buckets as ever
    assert [tight.slots_for(9, n) for n in (62, 63, 83, 84, 111, 112)] == [16, 12, 12, 9, 9, 9]
    assert [tight.slots_for(r, 100) for r in range(1, 11)] == [1, 2, 4, 4, 8, 8, 8, 8, 9, 10]
    assert (tight.alone_rows(3), free.alone_rows(3), tight.alone_rows(40)) == (3, 4, 16)
    with pytest.raises(ValueError):
        tight.slots_for(17, 10)


@pytest.mark.parametrize(("rows", "budget", "slots"), [(9, 380, 9), (9, 500, 12), (11, 500, 12)])
def test_fallback_slots_at_their_edge_copy_no_kv_and_stay_in_the_budget(
    reallocations: list[tuple[int, int]], rows: int, budget: int, slots: int
) -> None:
    """Rows of up to 40 tokens under budgets where the bucket of 16 does not fit: 9.5 rows' worth takes the
    rows exactly, 12.5 rows' worth a multiple of 4, reserved alike by admission; a leave, a settle and a
    join, over and over, copy nothing, and the rectangle stays within the budget as the rows reach 40."""
    config = SlotConfig(16, budget_tokens=budget)
    batch = _empty(config)
    batch.longest = 40
    batch.join([_Rows(20) for _ in range(rows)])
    assert batch.capacity[0] == config.slots_for(rows, 40) == slots
    assert kv_slots.reserved_shape(None, config, rows, 40)[0] == slots
    made = len(_count(reallocations))
    for _ in range(4):
        kv.select(batch, list(range(1, batch.size)))
        kv.settle(batch)
        batch.join([_Rows(20)])
    assert len(_count(reallocations)) == made and batch.size == rows
    reached = kv_slots.reserved_shape(batch, config, 0, 40)
    assert reached[0] * reached[1] <= budget
    batch._lengths = [39 if n else 0 for n in batch._lengths]  # every row at its last column
    batch._step_span()
    assert batch.capacity == reached


def test_a_burst_of_joins_reallocates_once(reallocations: list[tuple[int, int]]) -> None:
    batch = kv.merge([_Rows(20 + i) for i in range(17)], SlotConfig(24))
    assert _count(reallocations) == [(24, 128)]  # not 1, 2, 4, 8, 16, 24 slots one after another
    batch = kv.merge([batch, *(_Rows(5) for _ in range(6)), _Rows(200)])
    assert _count(reallocations)[1:] == [(24, 256)]  # bucket full and a longer newcomer: one grow
    assert isinstance(batch, SlotBatch) and batch.lengths() == [20 + i for i in range(17)] + [5] * 6 + [200]


def test_sparse_rows_are_compacted_when_the_batch_settles(reallocations: list[tuple[int, int]]) -> None:
    """Memory still follows the rows down: to a bucket with a free slot at most half of S, to columns at
    most half of C; a join compacts and grows in one reallocation."""
    batch = kv.merge([_Rows(300), *(_Rows(10) for _ in range(15))], SlotConfig(16))
    assert isinstance(batch, SlotBatch) and batch.capacity == (16, 384)
    kv.select(batch, list(range(1, 16)))
    assert batch.capacity == (16, 384)  # a leave alone copies nothing
    kv.settle(batch)
    assert batch.capacity == (16, 128)  # the long row's columns are gone
    kv.select(batch, [0, 4, 8, 12])
    kv.settle(batch)
    assert batch.capacity == (8, 128) and batch.slots == [0, 1, 2, 3]  # 4 rows + 1 fit 8 <= 16 / 2
    kv.select(batch, [1])
    kv.merge([batch, _Rows(10)])  # 2 rows + 1: the bucket of 4, made once with the newcomer
    assert batch.capacity == (4, 128) and batch.slots == [0, 1]
    assert _count(reallocations)[1:] == [(16, 128), (8, 128), (4, 128)]


def test_a_join_zeroes_only_the_columns_an_earlier_occupant_wrote(monkeypatch: pytest.MonkeyPatch) -> None:
    """A freed slot's last occupant wrote up to its length (+ 1 for a step that failed): the newcomer's
    join clears those columns and leaves the never-written rest of the slot alone."""
    batch = _empty(SlotConfig(4))
    batch.join([_Rows(30, fill=float("nan")), _Rows(8)])
    kv.select(batch, [1])
    zeroed: list[int] = []
    zero = torch.Tensor.zero_

    def recording(self: torch.Tensor) -> torch.Tensor:
        zeroed.append(int(self.shape[-2]))
        return zero(self)

    monkeypatch.setattr(torch.Tensor, "zero_", recording)
    assert batch.join([_Rows(12)]) == [0]
    assert zeroed == [31 - 12] * 2 * _LAYERS  # columns [12, 31), not [12, 128)
    assert all(torch.isfinite(layer.keys[0]).all() for layer in batch.cache.layers)
    zeroed.clear()
    batch.join([_Rows(40)])  # a slot nobody wrote: nothing to clear
    assert zeroed == []


def test_a_compaction_gathers_only_the_columns_it_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _empty(SlotConfig(8, block=16))
    batch.join([_Rows(100), *(_Rows(5) for _ in range(4))])
    assert batch.capacity == (8, 112)
    kv.select(batch, [2, 4])  # slots 2 and 4 stay: a gather, not a slice
    gathered: list[tuple[int, ...]] = []
    index_select = torch.Tensor.index_select

    def recording(self: torch.Tensor, *args: Any) -> torch.Tensor:
        out = index_select(self, *args)
        if out.dim() == 4:
            gathered.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "index_select", recording)
    assert batch.settle() and batch.capacity == (4, 16)
    assert gathered == [(2, _HEADS, 16, _DIM)] * 2 * _LAYERS  # not (2, H, 112, D)


def test_a_closed_loop_at_a_bucket_edge_reallocates_once(
    engine: Any, reallocations: list[tuple[int, int]]
) -> None:
    """9 clients, each sending its next request as soon as the last one ends, in batches of up to 16: the
    rows go 9 -> 8 -> 9 at every completion. The buffers are made once, not compacted and grown again."""
    sched = scheduler_for(engine, kv_layout="slots", max_batch_size=16, prefix_cache=False)
    rec = Recorder()
    sched.bind(rec)
    sent = 0

    def send() -> str:
        nonlocal sent
        rid, sent = f"loop-{sent}", sent + 1
        sched.submit(
            prepare(engine, request(rid, f"Question {sent}", max_tokens=4 + sent % 7, temperature=0))
        )
        return rid

    live = [send() for _ in range(9)]
    completions = 0
    for _ in range(60):
        sched.step_once()
        for rid in [r for r in live if rec.final(r) is not None]:
            live[live.index(rid)] = send()
            completions += 1
    assert completions > 20
    layers = len(engine.loaded.model.model.language_model.layers)
    assert _count(reallocations, layers) == [(16, 128)]


class _FailingBuffer:
    """Makes the ``at``-th buffer a ``SlotBatch`` asks for after :meth:`arm` raise out of memory (the
    third: layer 1's keys, half-way through a reallocation)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int = 3) -> None:
        self.armed, self.calls = False, 0
        made = SlotBatch._buffer

        def buffer(batch: SlotBatch, *args: Any) -> torch.Tensor:
            if self.armed:
                self.calls += 1
                if self.calls == at:
                    self.armed = False
                    raise torch.OutOfMemoryError("injected out of memory")
            return made(batch, *args)

        monkeypatch.setattr(SlotBatch, "_buffer", buffer)

    def arm(self) -> None:
        self.armed, self.calls = True, 0


_FAILURES = {
    # a join that grows S from 1 to 2 (b arrives in the second step)
    "join": ([("a", "Why do cats purr?", 20), ("b", "Name three rivers", 20)], "internal error"),
    # a decode step whose row passes the 128 columns
    "decode": ([("a", "Why do cats purr? " * 6, 140)], "decode step failed"),
    # the compaction once b and c have left a alone in a bucket of 4
    "compact": ([("a", "Why do cats purr?", 30), ("b", "Name three rivers", 2), ("c", "hi", 2)], "internal"),
}


def _first_then_the_rest(engine: Any, scenario: str, prefix: str) -> tuple[Any, Recorder, list[Any]]:
    """A slots scheduler running the requests of ``_FAILURES[scenario]`` (ids ``<prefix>-<row>``): the
    first one stepped once alone, the others submitted after it."""
    sched = scheduler_for(engine, kv_layout="slots", max_batch_size=8, prefix_cache=False)
    rec = Recorder()
    sched.bind(rec)
    specs, _ = _FAILURES[scenario]
    prepared = [
        prepare(engine, request(f"{prefix}-{r}", text, max_tokens=n, temperature=0)) for r, text, n in specs
    ]
    sched.submit(prepared[0])
    sched.step_once()
    for p in prepared[1:]:
        sched.submit(p)
    return sched, rec, prepared


@pytest.mark.parametrize("where", list(_FAILURES))
def test_a_reallocation_failing_half_way_fails_the_rows_and_the_engine_recovers(
    engine: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The batch's buffers are lost (``SlotBatch.lost``): its rows end with an error at once, without
    isolation probing (which would decode copies of KV that is gone), and a later request decodes what
    ``generate`` alone does."""
    failing = _FailingBuffer(monkeypatch)
    probes: list[int] = []
    import services.model.engine.scheduler as scheduler_module

    real_culprits = scheduler_module.culprits
    monkeypatch.setattr(
        scheduler_module, "culprits", lambda n, probe: probes.append(n) or real_culprits(n, probe)
    )
    sched, rec, prepared = _first_then_the_rest(engine, where, where)
    message = _FAILURES[where][1]
    failing.arm()
    drain(sched)
    assert not failing.armed  # the fault fired
    finals = [rec.final(p.request_id) for p in prepared]
    assert finals[0] is not None and finals[0].finish_reason == "error" and message in (finals[0].error or "")
    assert probes == [] and sched._batch is None
    assert sched.kv_bytes()[0] == 0  # nothing reserved once the failed rows are gone (no stale joiners)
    later = prepare(engine, request(f"{where}-later", "hi there", max_tokens=12, temperature=0))
    sched.submit(later)
    drain(sched)
    assert sched.tokens[later.request_id] == reference_tokens(engine, later)


def test_a_compaction_failing_before_it_released_anything_leaves_the_rows_running(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compaction is optional: out of memory for its first new buffer (every old layer still whole)
    is logged, the batch is not lost, and the rows finish as ``generate`` alone does."""
    failing = _FailingBuffer(monkeypatch, at=1)
    sched, rec, prepared = _first_then_the_rest(engine, "compact", "keep")
    while any(rec.final(p.request_id) is None for p in prepared[1:]):
        sched.step_once()
    failing.arm()  # b and c have left a alone in a bucket of 4: the next step compacts
    drain(sched)
    assert not failing.armed  # the fault fired
    for p in prepared:
        final = rec.final(p.request_id)
        assert final is not None and final.finish_reason == "length", p.request_id
        assert sched.tokens[p.request_id] == reference_tokens(engine, p)


def test_the_reservation_keeps_the_slots_held_when_the_longest_row_shrinks() -> None:
    """A batch sized by the budget fallback (S = 9: a bucket of 16 would not fit) whose long rows left
    while a short row still holds slot 8 keeps its (9, 1024) buffers until it settles: the reservation must
    count them, not the bucket shape a short ``longest`` would pick for a new batch (16 x 128)."""
    config = SlotConfig(16, budget_tokens=10_000)
    assert config.slots_for(9, 900) == 9 and config.slots_for(9, 100) == 16
    held = SimpleNamespace(high_after=lambda new_rows: 9, capacity=(9, 1024))  # slot 8 in use, 0-7 free
    for joining in (0, 1):
        slots, columns = kv_slots.reserved_shape(held, config, joining, 100)  # type: ignore[arg-type]
        assert slots * columns >= 9 * 1024, joining
    grown = SimpleNamespace(high_after=lambda new_rows: 9 + new_rows, capacity=(9, 1024))
    assert kv_slots.reserved_shape(grown, config, 2, 100)[0] == config.slots_for(11, 100)  # past S: grows
