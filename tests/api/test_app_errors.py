"""The app's last resort, in process: an unexpected exception is a 500 in the error shape with the request id
and no stack trace, and the request id header appears once."""

from __future__ import annotations

import httpx
import pytest

from services.api.main import create_app
from services.api.settings import ApiSettings

pytestmark = pytest.mark.anyio


async def test_an_unexpected_exception_is_a_500_with_the_request_id_and_no_trace() -> None:
    app = create_app(ApiSettings(persist_sessions=False))  # type: ignore[call-arg]

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at /srv/app.py line 12")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        r = await client.get("/boom", headers={"X-Request-Id": "req-500"})
    assert r.status_code == 500 and r.headers.get_list("x-request-id") == ["req-500"]
    error = r.json()["error"]
    assert error["type"] == "server_error" and "req-500" in error["message"]
    assert "secret internals" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
