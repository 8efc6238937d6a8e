"""API service settings: every variable validated at start; a bad value stops the service naming it."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.api.media import FetchLimits
from services.protocol.generate import MAX_CHOICES

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"


class SettingsError(Exception):
    """Configuration is invalid; the message names the offending variables (never their secret values)."""


class ApiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore", case_sensitive=False)

    # where it listens (gunicorn.conf.py binds API_HOST:API_PORT)
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(default=2, ge=1, le=64)

    # what it serves; the model replica's own id wins when it reports one
    model_repo_id: str = "Qwen/Qwen3-VL-2B-Thinking"
    hf_token: SecretStr | None = None  # never used here; known only so logs can redact it

    # the model service: comma-separated URLs; a host name may resolve to several replicas
    model_service_url: str = "http://127.0.0.1:8001"
    internal_token: SecretStr | None = None
    model_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    model_read_timeout_seconds: float = Field(default=600.0, gt=0)  # silence on a model stream = broken
    model_status_cache_seconds: float = Field(default=0.5, ge=0)

    # sessions
    persist_sessions: bool = True
    sessions_db_path: str = "data/sessions.db"
    database_url: SecretStr | None = None
    sessions_ttl_seconds: float = Field(default=86_400.0, gt=0)
    cancel_after_disconnect_seconds: float = Field(default=3600.0, ge=0)

    # streaming mechanics
    sse_ping_seconds: float = Field(default=10.0, gt=0, le=15)
    # store writes are batched per interval; text arriving meanwhile merges into one chunk (the coalescing)
    event_flush_ms: float = Field(default=25.0, ge=0, le=1000)
    runner_lease_seconds: float = Field(default=10.0, ge=0.5)  # a dead runner is taken over after this
    # a failing store write (flush, final events, lease) is retried with back-off this long; then the runner
    # hands the session over (stops renewing its lease) and this process retries the takeover later
    store_retry_seconds: float = Field(default=30.0, gt=0)
    # while the database is failing, a call waits at most this long for a connection (503 within ~1 s)
    store_fail_fast_seconds: float = Field(default=1.0, gt=0)
    # a Postgres call whose connection gives no answer within this fails (StoreUnavailable, 503) instead of
    # hanging on a stalled database; also the server-side statement_timeout of the pool's connections
    store_call_timeout_seconds: float = Field(default=5.0, gt=0, le=600)
    # sessions nobody runs (queued/running, lease lapsed more than this long ago: their process died, no
    # client came back) are adopted by a sweep this often, at most ORPHAN_SWEEP_LIMIT per sweep and process
    orphan_sweep_seconds: float = Field(default=10.0, gt=0, le=3600)
    orphan_sweep_limit: int = Field(default=32, ge=1, le=10_000)
    cancel_wait_seconds: float = Field(default=10.0, gt=0)

    # limits and auth
    api_keys: SecretStr | None = None
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # cheap bounds checked before any media is fetched or the model service is asked (a 10k-message body
    # would otherwise cost a minute of template rendering and tokenizing before "too long")
    max_messages: int = Field(default=2048, ge=1)
    max_content_parts: int = Field(default=512, ge=1)  # per message
    # choices per request (``n``); each is a batch row of the model service (which also caps n at its
    # MAX_BATCH_SIZE)
    max_n: int = Field(default=8, ge=1, le=MAX_CHOICES)
    retry_after_seconds: int = Field(default=5, ge=1)

    # media (services/api/media.py): remote fetches go through its SSRF guard
    media_max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    media_max_video_bytes: int = Field(default=48 * 1024 * 1024, ge=1024)
    media_fetch_timeout_seconds: float = Field(default=15.0, gt=0)
    media_max_redirects: int = Field(default=3, ge=0, le=10)
    media_allow_private: bool = False  # local runs/tests only: lets remote URLs reach private networks
    media_allowed_networks: str = ""  # comma-separated CIDRs opened despite the guard (an internal store)
    # per request, before and while fetching: the media bytes fetched in all, fetches at once; images and
    # videos (the model service's own variables: keep them equal); frames of a frame-list video fetched
    # (every k-th kept, the rate divided by k, so timestamps stay right)
    media_max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    media_fetch_concurrency: int = Field(default=4, ge=1, le=64)
    max_images_per_request: int = Field(default=16, ge=0)
    max_videos_per_request: int = Field(default=2, ge=0)
    max_video_frames: int = Field(default=32, ge=1, le=768)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("hf_token", "internal_token", "database_url", "api_keys", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `API_KEYS=` in an env file means "not set", not "one empty key"
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("model_service_url")
    @classmethod
    def _urls(cls, value: str) -> str:
        urls = [u.strip() for u in value.split(",") if u.strip()]
        if not urls or not all(u.startswith(("http://", "https://")) for u in urls):
            raise ValueError("expected one or more comma-separated http(s):// URLs")
        return ",".join(u.rstrip("/") for u in urls)

    @field_validator("media_allowed_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        for cidr in (c.strip() for c in value.split(",") if c.strip()):
            ipaddress.ip_network(cidr, strict=False)  # ValueError names the bad entry
        return value

    def fetch_limits(self) -> FetchLimits:
        return FetchLimits(
            max_image_bytes=self.media_max_image_bytes,
            max_video_bytes=self.media_max_video_bytes,
            fetch_timeout_seconds=self.media_fetch_timeout_seconds,
            max_redirects=self.media_max_redirects,
            allow_private=self.media_allow_private,
            allowed_networks=tuple(c.strip() for c in self.media_allowed_networks.split(",") if c.strip()),
        )

    def model_urls(self) -> list[str]:
        return self.model_service_url.split(",")

    def key_hashes(self) -> frozenset[str]:
        """sha256 hex of each configured API key; empty means the service is open."""
        if self.api_keys is None:
            return frozenset()
        keys = [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        return frozenset(hashlib.sha256(k.encode()).hexdigest() for k in keys)

    def secrets(self) -> list[str]:
        """Every secret value that must never reach a log line."""
        values: list[str] = []
        for secret in (self.hf_token, self.internal_token, self.database_url, self.api_keys):
            if secret is not None:
                values.append(secret.get_secret_value())
        if self.api_keys is not None:
            values += [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        return [v for v in values if len(v) >= 4]


def load_settings() -> ApiSettings:
    """Read the environment; raise SettingsError naming each bad variable (and not echoing its value)."""
    try:
        return ApiSettings()
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()]
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
