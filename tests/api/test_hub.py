"""The hub and replay against the in-memory store and a typed fake model: pings while idle, ownership and
expiry lookups, and a reader that takes over an orphaned session (lapsed lease) and follows it to [DONE]."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

from services.api.errors import NotFound
from services.api.metrics import ApiMetrics
from services.api.settings import ApiSettings
from services.api.store.base import AppendBatch, SessionRecord, StoredEvent
from services.api.store.memory import MemoryStore
from services.api.streaming.hub import SessionHub
from services.api.streaming.replay import follow
from services.api.streaming.translate import ChunkEncoder
from tests.api.fakes import FakeModel, script
from tests.api.test_runner import REASONING, texts

pytestmark = pytest.mark.anyio


def make_hub(store: MemoryStore, model: FakeModel | None = None, **overrides: Any) -> SessionHub:
    settings = ApiSettings(
        sse_ping_seconds=overrides.pop("sse_ping_seconds", 0.1),
        runner_lease_seconds=overrides.pop("runner_lease_seconds", 2),
        event_flush_ms=5,
        cancel_after_disconnect_seconds=0,
        **overrides,
    )
    return SessionHub(settings, store, model or FakeModel([]), ApiMetrics())  # type: ignore[arg-type]


def record(sid: str, **fields: Any) -> SessionRecord:
    now = time.time()
    base: dict[str, Any] = {
        "owner": "me",
        "status": "running",
        "created": now,
        "updated": now,
        "model_url": "http://m",
        "model_request_id": "rid",
        "runner_id": "elsewhere",
        "lease_until": now + 60,
        "meta": {"chunk_id": "chatcmpl-h", "created": 1, "model": "m", "include_usage": False},
    }
    return SessionRecord(id=sid, **(base | fields))


async def test_an_idle_follower_gets_pings() -> None:
    store = MemoryStore()
    await store.create(record("idle"))
    hub = make_hub(store)
    started = time.monotonic()
    stream = follow(hub, "idle", -1)
    assert await asyncio.wait_for(anext(stream), 2) is None
    assert time.monotonic() - started < 1.0
    assert hub.attachments.count("idle") == 1
    await stream.aclose()
    assert hub.attachments.count("idle") == 0


async def test_find_checks_owner_and_expiry() -> None:
    store = MemoryStore()
    hub = make_hub(store, sessions_ttl_seconds=10)
    await store.create(record("mine"))
    await store.create(record("old", status="completed", updated=time.time() - 60))
    assert (await hub.find("mine", "me")) is not None
    with pytest.raises(NotFound):
        await hub.find("mine", "someone-else")
    assert await hub.find("old", "me") is None
    assert await hub.find("missing", "me") is None


async def test_a_reader_takes_over_an_orphaned_session_and_follows_it_to_the_end() -> None:
    events = script(REASONING, ["answer"])
    store = MemoryStore()
    enc = ChunkEncoder("chatcmpl-h", 1, "m")
    await store.create(record("orphan", lease_until=time.time() - 1))  # its runner died
    await store.append(
        "orphan",
        AppendBatch(
            [StoredEvent(0, enc.role()), StoredEvent(1, enc.reasoning("r0 r1 "))],
            model_seq=1,
            now=time.time(),
        ),
    )
    model = FakeModel(events)
    hub = make_hub(store, model)
    got = [e async for e in follow(hub, "orphan", 0) if e is not None]
    assert model.reattached == [1]
    assert [e.index for e in got] == list(range(1, len(got) + 1))
    everything = await store.read("orphan", -1)
    assert texts(everything)[0] == "".join(REASONING) and everything[-1].data == "[DONE]"
    assert (await store.get("orphan")).status == "completed"  # type: ignore[union-attr]
    await hub.close()


def test_owner_is_dead_only_for_a_gone_process_of_this_host() -> None:
    import subprocess
    import sys

    from services.api.streaming.owner import new_runner_id, owner_is_dead, parse_runner_id

    mine = new_runner_id()
    me = parse_runner_id(mine)
    assert me is not None and me.pid == os.getpid() and len(me.boot) == 12 and len(mine) <= 120
    host, boot, namespace = me.host, me.boot, me.namespace
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = f"{host}:{boot}:{namespace}:{child.pid}:abcd1234"
    assert not owner_is_dead(mine) and not owner_is_dead(alive)
    child.kill()
    child.wait()
    assert owner_is_dead(alive)
    assert not owner_is_dead(f"other-host:{boot}:{namespace}:{child.pid}:abcd1234")  # another host: unsure
    # the same host name and root pid namespace on another machine (or after a reboot): unsure
    assert not owner_is_dead(f"{host}:000000000000:{namespace}:{child.pid}:abcd1234")
    assert not owner_is_dead(f"{host}::{namespace}:{child.pid}:abcd1234")  # boot id unknown there
    assert not owner_is_dead(f"{host}:{boot}:1:{child.pid}:abcd1234")  # another pid namespace: unsure
    assert not owner_is_dead(f"{host}:{namespace}:{child.pid}:abcd1234")  # the old 4-part shape: unsure
    assert not owner_is_dead("elsewhere") and not owner_is_dead(None)


def test_runner_ids_stay_bounded_and_parseable_for_any_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from services.api.streaming.owner import new_runner_id, parse_runner_id

    monkeypatch.setattr(socket, "gethostname", lambda: "odd:host name/" + "x" * 300)
    runner_id = new_runner_id()
    parsed = parse_runner_id(runner_id)
    assert parsed is not None and parsed.pid == os.getpid()
    assert len(parsed.host) == 63 and ":" not in parsed.host and " " not in parsed.host
    assert len(runner_id) <= 120


async def test_a_reader_takes_over_at_once_from_a_dead_runner_process() -> None:
    import sys

    from services.api.streaming.owner import new_runner_id, parse_runner_id

    me = parse_runner_id(new_runner_id())
    assert me is not None
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()  # the runner's process is gone; its lease has a minute left
    dead = f"{me.host}:{me.boot}:{me.namespace}:{child.pid}:deadbeef"
    store = MemoryStore()
    enc = ChunkEncoder("chatcmpl-h", 1, "m")
    await store.create(record("orphan", runner_id=dead, lease_until=time.time() + 60))
    await store.append("orphan", AppendBatch([StoredEvent(0, enc.role())], model_seq=-1, now=time.time()))
    model = FakeModel(script(REASONING, []))
    hub = make_hub(store, model, runner_lease_seconds=60)
    started = time.monotonic()
    got = [e async for e in follow(hub, "orphan", 0) if e is not None]
    assert time.monotonic() - started < 2.0
    assert model.reattached == [-1] and got[-1].data == "[DONE]"
    assert [e.index for e in got] == list(range(1, len(got) + 1))
    await hub.close()


async def until_final(store: MemoryStore, sid: str, within: float) -> SessionRecord:
    deadline = time.monotonic() + within
    while True:
        got = await store.get(sid)
        assert got is not None
        if got.status in ("completed", "failed", "cancelled"):
            return got
        assert time.monotonic() < deadline, f"{sid} still {got.status}"
        await store.wait(sid, got.last_index, 0.2)


@pytest.mark.parametrize("known", [True, False], ids=["reattached", "generation-lost"])
async def test_the_sweep_adopts_orphans_no_reader_comes_back_to(known: bool) -> None:
    """Sessions whose runner's process died (or handed them over and then died) with no client: the sweep
    claims them and completes them, or ends them visibly with generation_lost when the model forgot the
    generation. Sessions with a live lease, or one that lapsed less than ORPHAN_SWEEP_SECONDS ago, are left
    alone."""
    now = time.time()
    store = MemoryStore()
    enc = ChunkEncoder("chatcmpl-h", 1, "m")
    await store.create(record("orphan", lease_until=now - 60))  # lapsed a minute ago, nobody reads it
    await store.append("orphan", AppendBatch([StoredEvent(0, enc.role())], model_seq=-1, now=now))
    await store.create(record("queued", status="queued", runner_id=None, lease_until=0.0))  # opener died
    await store.create(record("held", lease_until=now + 60))  # a live runner elsewhere
    await store.create(record("just-lapsed", lease_until=now - 1))  # too recent: a reader may still come
    model = FakeModel(script(REASONING, ["answer"]), known=known)
    hub = make_hub(store, model, orphan_sweep_seconds=10, runner_lease_seconds=5)
    try:
        assert await hub.adopt_orphans() == 2
        assert await hub.adopt_orphans() == 0  # running here now: not adopted twice
        orphan = await until_final(store, "orphan", within=5)
        queued = await until_final(store, "queued", within=5)
        assert (orphan.runner_id, queued.runner_id) == (hub.runner_id, hub.runner_id)
        for sid in ("orphan", "queued"):
            stored = await store.read(sid, -1)
            assert [e.index for e in stored] == list(range(len(stored))) and stored[-1].data == "[DONE]"
        if known:
            assert model.reattached == [-1, -1] and orphan.status == queued.status == "completed"
            assert texts(await store.read("orphan", -1))[0] == "".join(REASONING)
        else:
            assert orphan.status == queued.status == "failed"
            assert '"code":"generation_lost"' in (await store.read("orphan", -1))[-2].data.replace(" ", "")
        for untouched in ("held", "just-lapsed"):
            got = await store.get(untouched)
            assert got is not None and got.status == "running" and got.runner_id == "elsewhere"
    finally:
        await hub.close()


async def test_the_orphan_sweep_runs_by_itself() -> None:
    store = MemoryStore()
    await store.create(record("orphan", lease_until=time.time() - 60))
    model = FakeModel(script(REASONING, ["answer"]))
    hub = make_hub(store, model, orphan_sweep_seconds=0.5)
    hub.start()
    try:
        started = time.monotonic()
        assert (await until_final(store, "orphan", within=5)).status == "completed"
        assert time.monotonic() - started < 3.0  # one sweep (0.375..0.5 s) and the generation
    finally:
        await hub.close()


@pytest.mark.parametrize("cancel_after", [4.0, 0.0])
async def test_a_reader_elsewhere_counts_while_its_marks_are_recent(cancel_after: float) -> None:
    # A non-streaming client that leaves cancels its generation at once only when nobody else reads it:
    # a reader of another process shows in reader_seen_at (set equal to `created` at creation).
    from services.api.streaming.hub import READER_GRACE_SECONDS, reader_heartbeat_seconds

    store = MemoryStore()
    settings = ApiSettings(cancel_after_disconnect_seconds=cancel_after, event_flush_ms=5)
    hub = SessionHub(settings, store, FakeModel([]), ApiMetrics())  # type: ignore[arg-type]
    created = time.time() - 30
    await store.create(record("s", created=created, reader_seen_at=created))
    assert not await hub.read_elsewhere("s")  # nobody ever attached elsewhere
    hub.attachments.attach("s")
    assert await hub.read_elsewhere("s")  # a client of this process follows it
    hub.attachments.detach("s")
    await hub.heartbeat("s")
    assert await hub.read_elsewhere("s")  # one of another process marked itself just now
    beat = reader_heartbeat_seconds(cancel_after)
    assert 0 < beat <= 5  # readers mark themselves with auto-cancel off too
    stale = time.time() - 2 * beat - READER_GRACE_SECONDS - 1
    await store.update("s", now=time.time(), reader_seen_at=stale)
    assert not await hub.read_elsewhere("s")  # it came and went: an old mark no longer counts


async def test_replaying_a_finished_session_writes_nothing() -> None:
    store = MemoryStore()
    settings = ApiSettings(cancel_after_disconnect_seconds=4.0, event_flush_ms=5)
    hub = SessionHub(settings, store, FakeModel([]), ApiMetrics())  # type: ignore[arg-type]
    now = time.time()
    await store.create(record("done", status="completed", created=now, reader_seen_at=now))
    events = [StoredEvent(0, "{}"), StoredEvent(1, "[DONE]")]
    await store.append("done", AppendBatch(events, model_seq=0, now=now))
    seen = [e.data async for e in follow(hub, "done", -1) if e is not None]
    assert seen == ["{}", "[DONE]"]
    after = await store.get("done")
    assert after is not None and after.reader_seen_at == now  # no heartbeat for a session nobody runs
