"""ModelClient replica handling with an in-memory transport and resolver: DNS names that resolve to several
addresses become several replicas, the least busy ready one is picked, and failures map to typed errors."""

from __future__ import annotations

import json

import httpx
import pytest

from services.api.model_client import ModelClient
from services.api.settings import ApiSettings
from services.protocol import paths
from services.protocol.errors import NotReady, Overloaded, PromptTooLong
from services.protocol.generate import GenerateRequest, Message

pytestmark = pytest.mark.anyio


def load(ready: bool = True, running: int = 0, queued: int = 0, batch: int = 4) -> dict[str, object]:
    return {
        "ready": ready,
        "model": "m",
        "running": running,
        "queued": queued,
        "max_batch_size": batch,
        "max_queue": 8,
    }


def client_for(urls: str, loads: dict[str, dict[str, object] | None], **extra: httpx.Response) -> ModelClient:
    async def resolve(host: str, port: int) -> list[str]:
        return ["10.0.0.1", "10.0.0.2"] if host == "model-svc" else [host]

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer tok"
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        if request.url.path == paths.STATUS:
            info = loads.get(base)
            return httpx.Response(200, json=info) if info else httpx.Response(503)
        return extra.get(
            request.url.path, httpx.Response(404, json={"error": {"code": "not_found", "message": ""}})
        )

    settings = ApiSettings(model_service_url=urls, internal_token="tok", model_status_cache_seconds=0)  # type: ignore[arg-type]
    return ModelClient(settings, resolve=resolve, transport=httpx.MockTransport(handle))


async def test_a_name_with_several_addresses_is_several_replicas() -> None:
    mc = client_for("http://model-svc:8001,http://10.0.0.9:8001", {})
    assert await mc.replica_urls() == ["http://10.0.0.1:8001", "http://10.0.0.2:8001", "http://10.0.0.9:8001"]
    await mc.close()


async def test_the_least_busy_ready_replica_is_picked() -> None:
    loads = {
        "http://10.0.0.1:8001": load(running=3),
        "http://10.0.0.2:8001": load(running=1),
        "http://10.0.0.9:8001": load(ready=False),
    }
    mc = client_for("http://model-svc:8001,http://10.0.0.9:8001", loads)
    assert await mc.pick() == ("http://10.0.0.2:8001", "m")
    assert (await mc.readiness())[0]
    await mc.close()


async def test_no_ready_replica_is_not_ready() -> None:
    mc = client_for("http://10.0.0.9:8001", {"http://10.0.0.9:8001": None})
    with pytest.raises(NotReady):
        await mc.pick()
    ok, reason = await mc.readiness()
    assert not ok and "unreachable" in reason
    await mc.close()


@pytest.mark.parametrize(
    ("status", "code", "exc"),
    [(400, "prompt_too_long", PromptTooLong), (429, "overloaded", Overloaded), (503, "not_ready", NotReady)],
)
async def test_generate_errors_are_typed(status: int, code: str, exc: type[Exception]) -> None:
    answer = httpx.Response(status, content=json.dumps({"error": {"code": code, "message": "m"}}).encode())
    mc = client_for("http://10.0.0.9:8001", {}, **{paths.GENERATE: answer})
    request = GenerateRequest(request_id="r1", messages=[Message(role="user", content="hi")])
    with pytest.raises(exc):
        await mc.generate("http://10.0.0.9:8001", request)
    assert await mc.cancel("http://10.0.0.9:8001", "r1") is None  # unknown there: 404
    await mc.close()


async def test_a_refused_connection_is_not_ready() -> None:
    settings = ApiSettings(model_service_url="http://127.0.0.1:9")  # type: ignore[arg-type]
    mc = ModelClient(settings)
    request = GenerateRequest(request_id="r1", messages=[Message(role="user", content="hi")])
    with pytest.raises(NotReady):
        await mc.generate("http://127.0.0.1:9", request)
    await mc.close()
