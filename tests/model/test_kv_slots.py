"""KV_LAYOUT=slots (kv_slots.GrowingLayer): the same greedy tokens as the concatenating layout while rows
join, leave and a failed step is undone; writes stay in place; views handed out are never overwritten."""

from __future__ import annotations

from pathlib import Path

import torch

from services.model.engine import batch as kv
from services.model.engine.kv_slots import BLOCK, GrowingLayer, grow_in_place
from tests.model.engine_support import tiny_engine

_PROMPTS = ("Tell me a story.", "List the planets in order please.", "Why is the sky blue?", "A haiku")


def _prefill(model: object, tokenizer: object, text: str) -> kv.BatchTensors:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]  # type: ignore[operator]
    return kv.prefill(model, {"input_ids": ids}, torch.device("cpu"))[1]


def _greedy_with_churn(model: object, tokenizer: object, grow: bool, steps: int = 40) -> list[list[int]]:
    batch = kv.merge([_prefill(model, tokenizer, p * (1 + i % 3)) for i, p in enumerate(_PROMPTS * 2)])
    joiners = [_prefill(model, tokenizer, p) for p in _PROMPTS]
    tokens: list[list[int]] = []
    for step in range(steps):
        if step % 5 == 4:  # one row leaves, a new one joins
            batch = kv.select(batch, [i for i in range(batch.size) if i != step % batch.size])
            batch = kv.merge([batch, kv.take(joiners[step % len(joiners)], [0])])
        if step == 7:  # a step that "failed": its cache writes are undone, then the step runs again
            saved = kv.snapshot(batch)
            mask, pos = batch.mask, batch.next_pos
            kv.decode(model, batch, grow=grow)
            kv.restore(batch, saved)
            batch.mask, batch.next_pos = mask, pos
        logits = kv.decode(model, batch, grow=grow)
        batch.tokens = logits.argmax(-1, keepdim=True)
        tokens.append(batch.tokens.flatten().tolist())
    return tokens


def test_slots_layout_decodes_the_same_tokens_as_concat(tiny_model_dir: Path) -> None:
    engine = tiny_engine(tiny_model_dir)
    model, tokenizer = engine.loaded.model, engine.loaded.processor.tokenizer
    with torch.inference_mode():
        assert _greedy_with_churn(model, tokenizer, True) == _greedy_with_churn(model, tokenizer, False)


def test_a_step_writes_in_place_and_kept_views_stay_untouched(tiny_model_dir: Path) -> None:
    engine = tiny_engine(tiny_model_dir)
    model, tokenizer = engine.loaded.model, engine.loaded.processor.tokenizer
    with torch.inference_mode():
        batch = _prefill(model, tokenizer, "Hello there")
        kept = [(layer.keys, layer.values) for layer in batch.cache.layers]  # what the prefix cache keeps
        kept_copy = [(k.clone(), v.clone()) for k, v in kept]
        kv.decode(model, batch, grow=True)
        layer = batch.cache.layers[0]
        assert isinstance(layer, GrowingLayer)
        buffer = layer._k.data
        assert buffer is not None and buffer.shape[2] == BLOCK  # one block holds the short prompt
        first = layer.keys.shape[2]
        kv.decode(model, batch, grow=True)
        assert layer._k.data is buffer and layer.keys.shape[2] == first + 1  # written in place
        assert kv.nbytes(batch) == sum(g.allocated_bytes() for g in batch.cache.layers)
        for (k, v), (k0, v0) in zip(kept, kept_copy, strict=True):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_buffers_grow_by_whole_blocks() -> None:
    cache = kv.DynamicCache()
    cache.update(torch.ones(2, 1, BLOCK - 1, 4), torch.ones(2, 1, BLOCK - 1, 4), 0)
    grow_in_place(cache)
    layer = cache.layers[0]
    layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))  # fills the block
    assert layer._k.data.shape[2] == BLOCK and layer.keys.shape == (2, 1, BLOCK, 4)
    layer.update(torch.zeros(2, 1, 1, 4), torch.zeros(2, 1, 1, 4))  # one more block
    assert layer._k.data.shape[2] == 2 * BLOCK and layer.keys.shape == (2, 1, BLOCK + 1, 4)
    assert torch.equal(layer.keys[:, :, : BLOCK - 1], torch.ones(2, 1, BLOCK - 1, 4))
