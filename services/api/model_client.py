"""The one pooled HTTP client to the model service replicas: pick, generate, re-attach, cancel, status.

``MODEL_SERVICE_URL`` is a comma-separated list; a host name that resolves to several addresses (a k8s
headless Service) counts as one replica per address. The least busy ready replica is chosen from each
replica's STATUS (cached briefly, plus what this process dispatched since). Sessions record the replica URL,
so cancel and re-attach reach the replica that owns the generation.

Status caching never contradicts itself across paths: only a *ready* answer is served from the cache
(``MODEL_STATUS_CACHE_SECONDS``); a replica last seen not ready is asked again before any request is
refused (one status call in flight per replica, shared by concurrent callers); ``/ready`` always asks; a
failed call to a replica drops its cached status at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx

from services.api.settings import ApiSettings
from services.protocol import paths
from services.protocol.codec import decode_event
from services.protocol.errors import NotReady, error_from_body
from services.protocol.events import Event, Finished
from services.protocol.generate import GenerateRequest

log = logging.getLogger("api.model_client")

_RESOLVE_TTL = 5.0


class StreamBroken(Exception):
    """The model stream ended or failed before its Finished event."""


class EventStream(Protocol):
    def events(self) -> AsyncIterator[Event]: ...

    async def aclose(self) -> None: ...


class GenerationBackend(Protocol):
    """What a runner needs from the model service (ModelClient; typed fakes in unit tests)."""

    async def events(self, url: str, request_id: str, after: int) -> EventStream: ...

    async def cancel(self, url: str, request_id: str) -> paths.CancelResult | None: ...


@dataclass(slots=True)
class _Replica:
    url: str
    info: paths.LoadInfo | None = None
    reason: str = "not checked yet"
    fetched_at: float = -1e9
    dispatched: int = 0  # generations this process sent since ``info`` was fetched

    def load(self) -> float:
        assert self.info is not None
        busy = self.info.running + self.info.queued + self.dispatched
        return busy / max(self.info.max_batch_size, 1)


@dataclass(slots=True)
class _Resolved:
    urls: list[str] = field(default_factory=list)
    at: float = -1e9


class ModelStream:
    """One open NDJSON event stream; iterate for events, always ``aclose``."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._response = response
        self.url = url

    async def events(self) -> AsyncIterator[Event]:
        try:
            async for line in self._response.aiter_lines():
                if not line.strip():
                    continue
                event = decode_event(line)
                yield event
                if isinstance(event, Finished):
                    return
        except (httpx.HTTPError, ValueError) as exc:  # ValueError: a malformed frame
            raise StreamBroken(f"model stream failed: {type(exc).__name__}") from exc
        raise StreamBroken("model stream ended without a finished event")

    async def aclose(self) -> None:
        await self._response.aclose()


Resolve = Callable[[str, int], Awaitable[list[str]]]


async def _system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class ModelClient:
    def __init__(
        self,
        settings: ApiSettings,
        *,
        resolve: Resolve | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._settings = settings
        self._resolve = resolve or _system_resolve
        headers = {}
        if settings.internal_token is not None:
            headers["Authorization"] = f"Bearer {settings.internal_token.get_secret_value()}"
        timeout = httpx.Timeout(
            connect=settings.model_connect_timeout_seconds,
            read=settings.model_read_timeout_seconds,
            write=60.0,
            pool=settings.model_connect_timeout_seconds,
        )
        limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
        self._http = httpx.AsyncClient(
            headers=headers, timeout=timeout, limits=limits, trust_env=False, transport=transport
        )
        self._replicas: dict[str, _Replica] = {}
        self._resolved: dict[str, _Resolved] = {}
        self._fetching: dict[str, asyncio.Future[_Replica]] = {}  # one status call in flight per replica

    async def close(self) -> None:
        await self._http.aclose()

    # ---- replicas -------------------------------------------------------------------------------------

    async def replica_urls(self) -> list[str]:
        urls: list[str] = []
        for configured in self._settings.model_urls():
            urls += await self._expand(configured)
        return list(dict.fromkeys(urls))

    async def _expand(self, url: str) -> list[str]:
        cached = self._resolved.get(url)
        now = time.monotonic()
        if cached and now - cached.at < _RESOLVE_TTL:
            return cached.urls
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        expanded = [url]
        if not _is_ip(host):
            try:
                addrs = list(dict.fromkeys(await self._resolve(host, port)))
                if len(addrs) > 1 and host != "localhost":
                    expanded = [_with_host(parts, a, port) for a in addrs]
            except OSError as exc:
                log.warning("cannot resolve model service host %s: %s", host, exc)
        self._resolved[url] = _Resolved(urls=expanded, at=now)
        return expanded

    async def _status(self, url: str, fresh: bool = False) -> _Replica:
        """The replica's status: from the cache only when it was ready and is younger than the cache
        time (and ``fresh`` is false); else asked now, sharing a call already in flight."""
        replica = self._replicas.setdefault(url, _Replica(url=url))
        age = time.monotonic() - replica.fetched_at
        ready = replica.info is not None and replica.info.ready
        if not fresh and ready and age < self._settings.model_status_cache_seconds:
            return replica
        fetching = self._fetching.get(url)
        if fetching is None:
            fetching = asyncio.ensure_future(self._fetch_status(replica))
            self._fetching[url] = fetching
            fetching.add_done_callback(lambda _f: self._fetching.pop(url, None))
        return await asyncio.shield(fetching)

    def invalidate(self, url: str) -> None:
        """A call to this replica failed: the next pick or readiness check asks it again."""
        replica = self._replicas.get(url)
        if replica is not None:
            replica.fetched_at = -1e9
            replica.info, replica.reason = None, "a request to it failed"

    async def _fetch_status(self, replica: _Replica) -> _Replica:
        url = replica.url
        try:
            response = await self._http.get(url + paths.STATUS, timeout=2.0)
            response.raise_for_status()
            replica.info = paths.LoadInfo.model_validate_json(response.content)
            replica.reason = "" if replica.info.ready else "model not loaded"
        except (httpx.HTTPError, ValueError) as exc:
            replica.info, replica.reason = None, f"unreachable ({type(exc).__name__})"
        replica.fetched_at = time.monotonic()
        replica.dispatched = 0
        return replica

    async def statuses(self, fresh: bool = False) -> list[_Replica]:
        urls = await self.replica_urls()
        return list(await asyncio.gather(*(self._status(u, fresh) for u in urls)))

    async def pick(self) -> tuple[str, str]:
        """(url, served model id) of the least busy ready replica; NotReady when none is."""
        replicas = await self.statuses()
        ready = [r for r in replicas if r.info is not None and r.info.ready]
        if not ready:
            raise NotReady("no model replica is ready")
        best = min(r.load() for r in ready)
        chosen = random.choice([r for r in ready if r.load() == best])
        chosen.dispatched += 1
        assert chosen.info is not None
        return chosen.url, chosen.info.model

    async def readiness(self) -> tuple[bool, str]:
        """(any replica ready, reason when none is): always asks the replicas (probes are rare)."""
        replicas = await self.statuses(fresh=True)
        if any(r.info is not None and r.info.ready for r in replicas):
            return True, "ok"
        return False, "; ".join(f"model replica {i}: {r.reason}" for i, r in enumerate(replicas))

    async def served_model(self) -> str | None:
        for replica in await self.statuses():
            if replica.info is not None:
                return replica.info.model
        return None

    # ---- generation -----------------------------------------------------------------------------------

    async def generate(self, url: str, request: GenerateRequest) -> ModelStream:
        body = (
            await asyncio.to_thread(request.__pydantic_serializer__.to_json, request)
            if _has_media(request)
            else request.__pydantic_serializer__.to_json(request)
        )
        http_request = self._http.build_request(
            "POST", url + paths.GENERATE, content=body, headers={"Content-Type": "application/json"}
        )
        return await self._open(http_request, url)

    async def events(self, url: str, request_id: str, after: int) -> ModelStream:
        path = paths.EVENTS.format(request_id=request_id)
        return await self._open(self._http.build_request("GET", url + path, params={"after": after}), url)

    async def cancel(self, url: str, request_id: str) -> paths.CancelResult | None:
        """Cancel on the replica that runs it; None when that replica does not know the request."""
        try:
            response = await self._http.post(url + paths.CANCEL.format(request_id=request_id), timeout=5.0)
        except httpx.HTTPError as exc:
            self.invalidate(url)
            raise NotReady(f"model service unreachable ({type(exc).__name__})") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise error_from_body(response.status_code, _json_or_none(response.content))
        return paths.CancelResult.model_validate_json(response.content)

    async def _open(self, http_request: httpx.Request, url: str) -> ModelStream:
        try:
            response = await self._http.send(http_request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            self.invalidate(url)
            raise NotReady(f"model service unreachable ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            self.invalidate(url)
            raise NotReady(f"model service failed ({type(exc).__name__})") from exc
        if response.status_code != 200:
            content = await response.aread()
            await response.aclose()
            if response.status_code == 503:
                self.invalidate(url)  # not ready (loading, draining): ask it again before trusting it
            raise error_from_body(response.status_code, _json_or_none(content))
        return ModelStream(response, url)


def _has_media(request: GenerateRequest) -> bool:
    """Media make the body megabytes of base64: serialize those off the event loop."""
    return any(
        not isinstance(m.content, str) and any(p.type != "text" for p in m.content) for m in request.messages
    )


def _json_or_none(content: bytes) -> object:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _with_host(parts: SplitResult, address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))
