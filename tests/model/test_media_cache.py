"""The processed-media cache: a resent image or video is neither decoded nor processed nor hashed again,
and what a hit prepares equals a fresh preparation (inputs, prefix key, greedy tokens)."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.model.engine import prefix
from services.model.multimodal import prompt
from services.model.multimodal.budget import processor_band, request_band, resize_frames, resize_image
from services.model.multimodal.images import decode_image
from services.model.multimodal.media_cache import MediaCache, MediaCacheStats, ProcessedMedia, media_key
from services.model.multimodal.prompt import MediaLimits, prepare_prompt
from services.model.multimodal.video import SAMPLE_FPS, decode_video, frame_list_video
from services.protocol.errors import InvalidMedia
from services.protocol.generate import (
    GenerateRequest,
    ImagePart,
    MediaOptions,
    Message,
    SamplingParams,
    TextPart,
    VideoPart,
)
from tests.model.engine_support import drain, reference_tokens, scheduler_for, tiny_engine
from tests.model.media import b64, mp4_b64, mp4_bytes, png_b64

LIMITS = MediaLimits(max_video_frames=32, max_image_pixels=16_777_216, max_media_bytes=16 << 20)
KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Any:
    return tiny_engine(tiny_model_dir)


@pytest.fixture
def processor(engine: Any) -> Any:
    return engine.loaded.processor


def user(*parts: Any) -> list[Message]:
    return [Message(role="user", content=list(parts))]


def one_call(processor: Any, messages: list[Message], options: MediaOptions | None = None) -> Any:
    """The oracle: every item decoded and resized, then ONE processor call on them all (no cache)."""
    band, videos, content = processor_band(processor), [], []
    for part in messages[0].content:
        if isinstance(part, TextPart):
            content.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            image = decode_image(part.data, LIMITS.max_image_pixels, LIMITS.max_media_bytes)
            item_band = request_band(band, options, part.detail == "low", LIMITS)
            content.append({"type": "image", "image": resize_image(image, item_band)})
        else:
            video = _decode(part, options)
            video.frames = resize_frames(video.frames, request_band(band, options, False, LIMITS))
            videos.append(video)
            content.append({"type": "video", "video": video.frames})
    kwargs: dict[str, Any] = {}
    if videos:
        kwargs = {"video_metadata": [v.metadata for v in videos], "do_sample_frames": False}
        kwargs["cap_pixels_per_frame"] = True
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        sanitize_control_tokens=True,
        processor_kwargs=kwargs,
    )


def _decode(part: VideoPart, options: MediaOptions | None) -> Any:
    fps = options.fps if options and options.fps else None
    frames = min(LIMITS.max_video_frames, options.max_frames if options and options.max_frames else 1 << 30)
    if part.frames:

        def image(data: str) -> np.ndarray:
            return np.asarray(decode_image(data, LIMITS.max_image_pixels, LIMITS.max_media_bytes))

        return frame_list_video(part.frames, part.fps or fps or SAMPLE_FPS, frames, image)
    return decode_video(
        part.data, frames, LIMITS.max_image_pixels, LIMITS.max_media_bytes, sample_fps=fps or SAMPLE_FPS
    )


def assert_same_inputs(got: Any, want: Any) -> None:
    assert set(got.keys()) == set(want.keys())
    for key in want:
        assert torch.equal(got[key], want[key]), key


def assert_same_key(got: prefix.PromptKey, want: prefix.PromptKey) -> None:
    assert torch.equal(got.ids, want.ids) and got.spans == want.spans


CASES = {
    "one image": (user(TextPart(text="hi"), ImagePart(data=png_b64(100, 70))), None),
    "three images, one low detail": (
        user(
            ImagePart(data=png_b64(100, 70, seed=1)),
            TextPart(text="and"),
            ImagePart(data=png_b64(300, 200, seed=2), detail="low"),
            ImagePart(data=png_b64(64, 64, seed=3)),
        ),
        None,
    ),
    "images with pixel budgets": (
        user(ImagePart(data=png_b64(500, 300, seed=1)), ImagePart(data=png_b64(200, 90, seed=2))),
        MediaOptions(max_pixels=100_000, min_pixels=20_000),
    ),
    "a video": (user(VideoPart(data=mp4_b64()), TextPart(text="x")), None),
    # two videos of one shape: the video processor batches them together in one call
    "two same-shape videos and an image": (
        user(
            VideoPart(data=mp4_b64(frames=8)),
            ImagePart(data=png_b64(80, 80)),
            VideoPart(data=b64(mp4_bytes(frames=8, gop=2))),
        ),
        MediaOptions(fps=3.0, max_frames=6),
    ),
    "frame lists": (
        user(
            VideoPart(frames=[png_b64(64, 64, seed=i) for i in range(5)], fps=2.0),
            VideoPart(frames=[png_b64(96, 64, seed=i + 9) for i in range(3)]),
        ),
        None,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_per_item_processing_miss_and_hit_equal_one_processor_call(processor: Any, case: str) -> None:
    messages, options = CASES[case]
    want = one_call(processor, messages, options)
    cache = MediaCache(256 << 20)
    items = sum(not isinstance(p, TextPart) for p in messages[0].content)
    for cached in (None, cache, cache):  # no cache, a miss, a hit
        assert_same_inputs(prepare_prompt(processor, messages, LIMITS, None, options, cached).inputs, want)
    assert (cache.stats().misses, cache.stats().hits, cache.stats().entries) == (items, items, items)


class _Counted:
    """Counts calls of a sub-processor (everything else is the real one's)."""

    def __init__(self, real: Any) -> None:
        self.real, self.calls = real, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_hit_skips_decode_processor_and_digest_and_keys_the_same(
    engine: Any, processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = user(ImagePart(data=png_b64(120, 90, seed=5)), VideoPart(data=mp4_b64()), TextPart(text="?"))
    cache = MediaCache(256 << 20)
    miss = prepare_prompt(processor, messages, LIMITS, cache=cache)
    images, videos = _Counted(processor.image_processor), _Counted(processor.video_processor)
    monkeypatch.setattr(processor, "image_processor", images)
    monkeypatch.setattr(processor, "video_processor", videos)
    digests = _Counted(prefix.media_digest)
    monkeypatch.setattr(prefix, "media_digest", digests)

    def no_decoding(*args: Any) -> Any:
        raise AssertionError("a cached item was decoded")

    monkeypatch.setattr(prompt, "decode_image", no_decoding)
    monkeypatch.setattr(prompt, "decode_video", no_decoding)
    hit = prepare_prompt(processor, messages, LIMITS, cache=cache)
    config = engine.loaded.model.config
    key = prefix.prompt_key(config, hit.inputs, hit.digests)
    assert (images.calls, videos.calls, digests.calls) == (0, 0, 0)
    assert_same_inputs(hit.inputs, miss.inputs)
    assert_same_key(key, prefix.prompt_key(config, miss.inputs))  # digests computed afresh from the pixels
    assert digests.calls == 2 and len(key.spans) == 2


def test_other_detail_budgets_sampling_or_bytes_are_misses(processor: Any) -> None:
    image, video = png_b64(300, 200, seed=1), mp4_b64(frames=12)
    cache = MediaCache(256 << 20)
    runs: list[tuple[list[Message], MediaOptions | None]] = [
        (user(ImagePart(data=image)), None),
        (user(ImagePart(data=image, detail="low")), None),
        (user(ImagePart(data=image)), MediaOptions(min_pixels=200_000)),
        (user(ImagePart(data=png_b64(300, 200, seed=2))), None),
        (user(VideoPart(data=video)), None),
        (user(VideoPart(data=video)), MediaOptions(fps=1.0)),
        (user(VideoPart(data=video)), MediaOptions(max_frames=2)),
        (user(VideoPart(frames=[image, image])), None),
        (user(VideoPart(frames=[image, image], fps=1.0)), None),
    ]
    for messages, options in runs:
        prepare_prompt(processor, messages, LIMITS, None, options, cache)
    assert (cache.stats().hits, cache.stats().misses) == (0, len(runs))
    for messages, options in runs:  # each again: all hits
        prepare_prompt(processor, messages, LIMITS, None, options, cache)
    assert cache.stats().hits == len(runs)


def test_the_byte_bound_evicts_the_least_recently_used() -> None:
    def item(rows: int) -> ProcessedMedia:
        return ProcessedMedia({"pixel_values": torch.zeros(rows, 256)}, "<pad>", b"d", rows)  # 1 KiB a row

    cache = MediaCache(10 * 1024)
    for name in (b"a", b"b", b"c"):
        cache.put(name, item(3))
    assert cache.get(b"a") is not None  # b is now the least recently used
    cache.put(b"d", item(3))
    assert cache.get(b"b") is None and all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    cache.put(b"big", item(11))  # larger than the whole bound: not kept, nothing evicted
    assert cache.get(b"big") is None
    cache.put(b"a", item(4))  # replaced: its old bytes are given back before the new ones are counted
    stats = cache.stats()
    assert (stats.entries, stats.nbytes, stats.evictions) == (3, 10 * 1024, 1)


def test_zero_bytes_disables_the_cache(processor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.model.settings import ModelSettings

    messages = user(ImagePart(data=png_b64(90, 90, seed=8)))
    cache = MediaCache(0)
    for _ in range(2):
        got = prepare_prompt(processor, messages, LIMITS, cache=cache)
        assert got.digests["pixel_values"] == [None]  # left to prompt_key
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.version) == (
        0,
        0,
        0,
        0,
    )  # nothing looked up or kept
    assert ModelSettings().media_cache_bytes == 512 * 1024 * 1024
    monkeypatch.setenv("MEDIA_CACHE_BYTES", "0")
    assert ModelSettings().media_cache_bytes == 0


def test_a_bad_image_fails_the_same_way_with_and_without_the_cache(processor: Any) -> None:
    bad = user(ImagePart(data=b64(b"not an image")))
    with pytest.raises(InvalidMedia) as plain:
        prepare_prompt(processor, bad, LIMITS)
    cache = MediaCache(256 << 20)
    for _ in range(2):  # a failure is never kept: the second attempt fails alike
        with pytest.raises(InvalidMedia) as cached:
            prepare_prompt(processor, bad, LIMITS, cache=cache)
        assert str(cached.value) == str(plain.value)
    assert cache.stats().entries == 0


def test_a_hit_still_counts_against_the_request_pixel_budget(processor: Any) -> None:
    image = png_b64(100, 100, seed=3)
    limits = MediaLimits(32, 16_777_216, 16 << 20, max_request_pixels=15_000)
    cache = MediaCache(256 << 20)
    prepare_prompt(processor, user(ImagePart(data=image)), limits, cache=cache)
    twice = user(ImagePart(data=image), ImagePart(data=image))
    with pytest.raises(InvalidMedia) as plain:
        prepare_prompt(processor, twice, limits)
    with pytest.raises(InvalidMedia) as cached:
        prepare_prompt(processor, twice, limits, cache=cache)
    assert str(cached.value) == str(plain.value)
    video = mp4_b64(frames=8)  # 4 frames of 64 x 64 sampled: 16,384 pixels
    video_limits = MediaLimits(32, 16_777_216, 16 << 20, max_request_pixels=20_000)
    prepare_prompt(processor, user(VideoPart(data=video)), video_limits, cache=cache)
    both = user(ImagePart(data=png_b64(64, 64)), VideoPart(data=video))
    with pytest.raises(InvalidMedia) as plain:
        prepare_prompt(processor, both, video_limits)
    with pytest.raises(InvalidMedia) as cached:
        prepare_prompt(processor, both, video_limits, cache=cache)
    assert str(cached.value) == str(plain.value)


def test_two_threads_preparing_the_same_image(processor: Any) -> None:
    messages = user(ImagePart(data=png_b64(400, 300, seed=4)), TextPart(text="What is it?"))
    want = one_call(processor, messages)
    cache = MediaCache(256 << 20)
    start = threading.Barrier(2)
    results: list[Any] = [None, None]

    def worker(i: int) -> None:
        start.wait()
        for _ in range(3):
            results[i] = prepare_prompt(processor, messages, LIMITS, cache=cache)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for got in results:
        assert_same_inputs(got.inputs, want)
    stats = cache.stats()
    assert stats.entries == 1 and stats.hits + stats.misses == 6 and stats.misses <= 2
    assert stats.nbytes == want["pixel_values"].numel() * 4 + want["image_grid_thw"].numel() * 8


def _turn(rid: str, image: str) -> GenerateRequest:
    messages = [
        Message(role="user", content=[ImagePart(data=image), TextPart(text="What is in the picture?")]),
        Message(role="assistant", content="A pattern of dots."),
        Message(role="user", content="Which colour is most common?"),
    ]
    return GenerateRequest(
        request_id=rid, messages=messages, sampling=SamplingParams(temperature=0, max_tokens=16)
    )


def test_greedy_tokens_of_a_hit_equal_without_the_cache_and_the_entry_stays_intact(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = png_b64(128, 96, seed=21)
    monkeypatch.setattr(engine, "media_cache", MediaCache(0))
    fresh = engine.prepare_sync(_turn("fresh", image))
    monkeypatch.setattr(engine, "media_cache", MediaCache(256 << 20))
    engine.prepare_sync(_turn("miss", image))
    hit = engine.prepare_sync(_turn("hit", image))
    assert engine.media_cache.stats().hits == 1
    assert_same_inputs(hit.inputs, fresh.inputs)
    assert_same_key(hit.prefix_key, fresh.prefix_key)
    (entry,) = engine.media_cache._entries.values()
    assert entry.tensors["pixel_values"] is hit.inputs["pixel_values"]  # shared, not copied
    sched = scheduler_for(engine, prefix_cache=False)
    sched.bind(lambda outputs: None)
    for prepared in (hit, fresh):
        sched.submit(prepared)
    drain(sched)
    want = reference_tokens(engine, fresh)
    assert len(set(want)) >= 3  # the tiny model's output depends on its input: the equality bites
    assert sched.tokens["hit"] == sched.tokens["fresh"] == want
    assert torch.equal(entry.tensors["pixel_values"], fresh.inputs["pixel_values"])  # never written to


def test_media_key_separates_parameters_and_frame_boundaries() -> None:
    assert media_key("image", (None,), ["abc"]) == media_key("image", (None,), ["abc"])
    assert media_key("image", (None,), ["abc"]) != media_key("image", (1,), ["abc"])
    assert media_key("frames", (), ["ab", "c"]) != media_key("frames", (), ["a", "bc"])
    assert media_key("frames", (), ["abc"]) != media_key("video", (), ["abc"])


def test_media_cache_metrics_reach_prometheus(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from services.model.metrics import ModelMetrics

    metrics = ModelMetrics()
    image = png_b64(128, 96, seed=33)
    monkeypatch.setattr(engine, "_observer", metrics)
    monkeypatch.setattr(engine, "media_cache", MediaCache(256 << 20))
    for rid in ("m1", "m2", "m3"):
        engine.prepare_sync(_turn(rid, image))
    with pytest.raises(InvalidMedia):  # a failed prepare reports too (its lookup was a miss)
        engine.prepare_sync(_turn("bad", b64(b"not an image")))
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.render(None).decode())
        for s in family.samples
    }
    assert samples["model_media_cache_hits_total"] == 2
    assert samples["model_media_cache_misses_total"] == 2
    assert samples["model_media_cache_evictions_total"] == 0
    assert samples["model_media_cache_entries"] == 1
    assert samples["model_media_cache_bytes"] == engine.media_cache.stats().nbytes > 0


def _media_samples(metrics: Any) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        s.name + "".join(f"/{v}" for v in s.labels.values()): s.value
        for family in text_string_to_metric_families(metrics.render(None).decode())
        for s in family.samples
        if s.name.startswith(
            ("model_media_cache", "model_prefix_cache", "model_kv_cache", "model_cuda_graph")
        )
    }


def test_a_late_media_snapshot_adds_nothing_and_leaves_the_gauges() -> None:
    from services.model.metrics import ModelMetrics

    metrics = ModelMetrics()
    newer = MediaCacheStats(hits=100, misses=50, entries=3, nbytes=300, version=151, epoch="e")
    older = MediaCacheStats(hits=99, misses=50, entries=2, nbytes=200, version=150, epoch="e")
    metrics.on_media_cache(newer)
    metrics.on_media_cache(older)  # another prepare thread's snapshot, taken before but handed on after
    samples = _media_samples(metrics)
    assert (samples["model_media_cache_hits_total"], samples["model_media_cache_misses_total"]) == (100, 50)
    assert (samples["model_media_cache_entries"], samples["model_media_cache_bytes"]) == (3, 300)


def test_a_restarted_engines_media_and_prefix_totals_count_from_zero_even_when_larger() -> None:
    from services.model.engine.base import KVCacheStats
    from services.model.metrics import ModelMetrics

    metrics = ModelMetrics()
    metrics.on_media_cache(MediaCacheStats(hits=1, misses=3, evictions=1, entries=2, version=5, epoch="a"))
    metrics.on_kv_cache(KVCacheStats(10, 20, 0, hits=1, misses=3, reused_tokens=40, epoch="a", eager_steps=7))
    # the new engine already counted more than the old one by its first report: no decrease to see
    metrics.on_media_cache(MediaCacheStats(hits=2, misses=5, evictions=1, entries=4, version=9, epoch="b"))
    metrics.on_kv_cache(KVCacheStats(11, 21, 0, hits=2, misses=5, reused_tokens=60, epoch="b", eager_steps=9))
    # and the old engine's last report arrives late: its growth counts, the gauges stay the new engine's
    metrics.on_media_cache(MediaCacheStats(hits=1, misses=4, evictions=1, entries=9, version=6, epoch="a"))
    metrics.on_kv_cache(KVCacheStats(99, 99, 0, hits=1, misses=4, reused_tokens=40, epoch="a", eager_steps=8))
    samples = _media_samples(metrics)
    assert samples["model_media_cache_hits_total"] == 3 and samples["model_media_cache_misses_total"] == 9
    assert samples["model_media_cache_evictions_total"] == 2 and samples["model_media_cache_entries"] == 4
    assert samples["model_prefix_cache_hits_total"] == 3 and samples["model_prefix_cache_misses_total"] == 9
    assert samples["model_prefix_cache_reused_tokens_total"] == 100
    assert samples["model_cuda_graph_decode_steps_total/eager"] == 8 + 9
    assert (samples["model_kv_cache_bytes/rows"], samples["model_kv_cache_bytes/prefixes"]) == (11, 21)


def test_snapshots_from_racing_prepare_threads_count_each_lookup_once() -> None:
    from services.model.metrics import ModelMetrics

    metrics, cache = ModelMetrics(), MediaCache(1 << 20)
    snapshots = [cache.stats()]
    for _ in range(6):
        cache.get(b"k")
        snapshots.append(cache.stats())
    for i in (3, 1, 6, 2, 5, 4, 0):  # the order four threads might hand them on in
        metrics.on_media_cache(snapshots[i])
    assert _media_samples(metrics)["model_media_cache_misses_total"] == 6
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        for _ in range(500):
            cache.get(b"k")
            metrics.on_media_cache(cache.stats())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _media_samples(metrics)["model_media_cache_misses_total"] == cache.stats().misses == 2006


def test_the_engine_process_keeps_the_newest_media_snapshot_and_stamps_its_kv_epoch() -> None:
    from services.model.engine.base import KVCacheStats
    from services.model.engine.worker import EngineWorker

    workers = [EngineWorker(conn=None), EngineWorker(conn=None)]
    worker = workers[0]
    cache = MediaCache(1 << 20)
    older = cache.stats()
    cache.get(b"k")
    newer = cache.stats()
    worker.on_media_cache(newer)
    worker.on_media_cache(older)
    assert worker._media == newer
    worker.on_kv_cache(KVCacheStats(1, 2, 3, 4, 5, 6))
    assert worker._report.kv_cache is not None and worker._report.kv_cache.epoch == worker.epoch
    assert worker.epoch and workers[0].epoch != workers[1].epoch
    assert MediaCache(0).epoch != cache.epoch


class _Tracked:
    """Wraps a resize function of ``prompt``: weak references to every array or image it takes or gives
    (the decoded media and what the processor is handed)."""

    def __init__(self, real: Any) -> None:
        self.real, self.refs = real, []

    def __call__(self, media: Any, band: Any) -> Any:
        out = self.real(media, band)
        self.refs += [weakref.ref(media), weakref.ref(out)]
        return out

    def alive(self) -> int:
        """How many of them (distinct objects) are still alive."""
        return len({id(obj) for obj in (ref() for ref in self.refs) if obj is not None})


@pytest.mark.parametrize("cached", [False, True])
def test_no_decoded_media_outlive_prepare_without_the_garbage_collector(
    processor: Any, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    images, frames = _Tracked(prompt.resize_image), _Tracked(prompt.resize_frames)
    monkeypatch.setattr(prompt, "resize_image", images)
    monkeypatch.setattr(prompt, "resize_frames", frames)
    messages = user(
        ImagePart(data=png_b64(120, 80, seed=41)),
        VideoPart(data=mp4_b64(frames=8)),
        VideoPart(frames=[png_b64(64, 64, seed=i) for i in range(4)]),
    )
    gc.collect()
    gc.disable()  # only reference counting frees now: a reference cycle would keep them all
    try:
        got = prepare_prompt(processor, messages, LIMITS, cache=MediaCache(256 << 20) if cached else None)
        assert len(images.refs) == 2 and len(frames.refs) == 4
        assert (images.alive(), frames.alive()) == (0, 0)
        assert got.inputs["pixel_values_videos"].shape[0] > 0
    finally:
        gc.enable()


class _Watching(_Counted):
    """A sub-processor that records ``watch()`` as each call begins."""

    def __init__(self, real: Any, watch: Any) -> None:
        super().__init__(real)
        self.watch, self.seen = watch, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.seen.append(self.watch())
        return super().__call__(*args, **kwargs)


def test_an_items_decoded_media_go_as_soon_as_it_is_processed(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _Tracked(prompt.resize_image)
    monkeypatch.setattr(prompt, "resize_image", images)
    watching = _Watching(processor.image_processor, images.alive)
    monkeypatch.setattr(processor, "image_processor", watching)
    messages = user(*(ImagePart(data=png_b64(100, 60 + i, seed=i)) for i in range(3)))
    gc.disable()
    try:
        prepare_prompt(processor, messages, LIMITS)
    finally:
        gc.enable()
    assert watching.seen == [3, 2, 1]  # all decoded before the template runs; each let go once processed
    assert images.alive() == 0


def _bypassing_hook(processor: Any, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``processor``'s class process ``kind`` without the per-item hook (as a transformers that does
    not route media through ``_process_images`` / ``_process_videos`` would)."""
    from transformers.processing_utils import ProcessorMixin

    cls, call, name = type(processor), type(processor).__call__, f"_process_{kind}s"

    def old_style_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        setattr(self, name, getattr(ProcessorMixin, name).__get__(self))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", old_style_call)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_media_that_bypass_the_per_item_path_fail_loudly(
    processor: Any, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    from services.model.multimodal.prompt import MediaRoutingError, check_media_routing

    part = ImagePart(data=png_b64(200, 100)) if kind == "image" else VideoPart(data=mp4_b64(frames=4))
    check_media_routing(processor)  # the pinned transformers routes both kinds
    _bypassing_hook(processor, kind, monkeypatch)
    with pytest.raises(MediaRoutingError, match=rf"_process_{kind}s.*transformers==5\.24\.0"):
        check_media_routing(processor)
    for cache in (None, MediaCache(256 << 20)):
        with pytest.raises(MediaRoutingError, match=rf"_process_{kind}s.*transformers==5\.24\.0"):
            prepare_prompt(processor, user(part, TextPart(text="x")), LIMITS, cache=cache)
    assert f"_process_{kind}s" not in vars(processor)  # the shared processor itself is never patched


def test_a_hook_handed_only_some_items_fails_loudly(processor: Any) -> None:
    from services.model.multimodal.prompt import MediaRoutingError, _process, _to_conversation

    images = [ImagePart(data=png_b64(50, 50, seed=i)) for i in range(2)]
    conv = _to_conversation(user(*images), LIMITS, processor_band(processor), None, None)
    with pytest.raises(MediaRoutingError, match="routed 1 of 2 images"):
        _process(processor, conv, "image", [[prompt._IMAGE_STAND_IN]], {}, {})


def test_an_item_the_processor_refuses_is_still_a_bad_request(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.protocol.errors import InvalidRequest

    class Refusing(_Counted):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise ValueError("height:1 is smaller than factor:32")

    monkeypatch.setattr(processor, "image_processor", Refusing(processor.image_processor))
    # the image's hook raises before the video's hook ever runs: not taken for a bypassed hook
    messages = user(ImagePart(data=png_b64(40, 40)), VideoPart(data=mp4_b64(frames=4)))
    with pytest.raises(InvalidRequest, match="could not be processed"):
        prepare_prompt(processor, messages, LIMITS)


def test_a_cached_video_meets_the_request_pixel_budget_as_its_miss_did(processor: Any) -> None:
    # 3000 x 1000 frames are decoded at 1920 x 1080 pixels' worth (2494 x 831 = 2,072,514): the header's
    # estimate (4 x 2,073,600 = 8,294,400) is what the decoder checks before it decodes anything
    video = mp4_b64(frames=4, width=3000, height=1000)
    limits = MediaLimits(32, 16_777_216, 64 << 20, max_request_pixels=8_300_000)
    cache = MediaCache(1 << 30)
    prepare_prompt(processor, user(VideoPart(data=video)), limits, cache=cache)
    (entry,) = cache._entries.values()
    assert entry.pixels < 8_290_000 < entry.checked_pixels == 4 * 1920 * 1080
    both = user(ImagePart(data=png_b64(100, 100)), VideoPart(data=video))  # room left: 8,290,000
    with pytest.raises(InvalidMedia) as plain:
        prepare_prompt(processor, both, limits)
    with pytest.raises(InvalidMedia) as cached:
        prepare_prompt(processor, both, limits, cache=cache)
    assert str(cached.value) == str(plain.value)
    assert cache.stats().hits == 1


def test_an_item_sent_twice_in_one_request_is_decoded_and_processed_once(
    processor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, video = png_b64(150, 100, seed=51), mp4_b64(frames=8)
    messages = user(
        ImagePart(data=image),
        VideoPart(data=video),
        TextPart(text="again:"),
        ImagePart(data=image),
        VideoPart(data=video),
        ImagePart(data=image, detail="low"),  # other parameters: another item
    )
    want = one_call(processor, messages)
    images, videos = _Counted(processor.image_processor), _Counted(processor.video_processor)
    monkeypatch.setattr(processor, "image_processor", images)
    monkeypatch.setattr(processor, "video_processor", videos)
    decodes = _Counted(prompt.decode_video)
    monkeypatch.setattr(prompt, "decode_video", decodes)
    cache = MediaCache(256 << 20)
    got = prepare_prompt(processor, messages, LIMITS, cache=cache)
    assert_same_inputs(got.inputs, want)
    assert (images.calls, videos.calls, decodes.calls) == (2, 1, 1)
    assert (cache.stats().misses, cache.stats().hits, cache.stats().entries) == (3, 0, 3)
    assert len(got.digests["pixel_values"]) == 3 and len(got.digests["pixel_values_videos"]) == 2
    # each place still counts against the request's pixel budget, as without the cache
    limits = MediaLimits(32, 16_777_216, 16 << 20, max_request_pixels=2 * 150 * 100 - 1)
    twice = user(ImagePart(data=image), ImagePart(data=image))
    for cached in (None, MediaCache(256 << 20)):
        with pytest.raises(InvalidMedia, match="decoded pixels in all"):
            prepare_prompt(processor, twice, limits, cache=cached)
