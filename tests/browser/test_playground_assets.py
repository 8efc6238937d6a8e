"""The playground's routes in the api app (no browser, no lifespan): the page and its assets with the strict
Content-Security-Policy, and only the allowed files; everything else the usual OpenAI 404."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.main import create_app
from services.api.routes.playground import CONTENT_SECURITY_POLICY, PLAYGROUND_DIR, asset_path
from services.api.settings import load_settings


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setenv("SESSIONS_DB_PATH", str(tmp_path / "sessions.db"))
    monkeypatch.setenv("API_KEYS", "k")
    return TestClient(create_app(load_settings()))  # no `with`: the lifespan (store, model) is not needed


def test_the_page_carries_a_csp_without_inline_scripts(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    csp = resp.headers["content-security-policy"]
    assert csp == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert resp.headers["x-content-type-options"] == "nosniff"
    # Nothing inline that the CSP would block: no inline script or style, no handler attributes.
    assert "<script>" not in resp.text and "<style" not in resp.text and "style=" not in resp.text
    assert not re.search(r"\son[a-z]+\s*=", resp.text)
    assert 'type="module" src="/playground/app.js"' in resp.text
    assert client.get("/?session=pg-x").status_code == 200  # no key needed for the page itself


@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("app.js", "text/javascript"),
        ("sse.js", "text/javascript"),
        ("style.css", "text/css"),
        ("icon.svg", "image/svg+xml"),
    ],
)
def test_assets_are_served_with_their_type_and_the_csp(
    client: TestClient, name: str, media_type: str
) -> None:
    resp = client.get(f"/playground/{name}")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith(media_type)
    assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert resp.content == (PLAYGROUND_DIR / name).read_bytes()


@pytest.mark.parametrize(
    "path",
    [
        "/playground/index.html",
        "/playground/missing.js",
        "/playground/..%2fmain.py",
        "/playground/%2e%2e%2fapi%2fmain.py",
        "/playground/App.js",
        "/playground/.hidden.js",
        "/playground/",
        "/index.html",
    ],
)
def test_anything_else_is_an_openai_404(client: TestClient, path: str) -> None:
    resp = client.get(path)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "not_found_error"
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_asset_path_never_leaves_the_folder(tmp_path: Path) -> None:
    (tmp_path / "ok.js").write_text("1")
    (tmp_path / "link.js").symlink_to(tmp_path / "ok.js")
    assert asset_path("ok.js", tmp_path) == tmp_path / "ok.js"
    for name in ("link.js", "../ok.js", "ok.py", "ok.js/", "", "x" * 70 + ".js"):
        assert asset_path(name, tmp_path) is None, name


def test_every_served_file_is_one_the_page_uses() -> None:
    html = (PLAYGROUND_DIR / "index.html").read_text()
    for name in ("app.js", "style.css", "icon.svg"):
        assert f"/playground/{name}" in html
    scripts = {p.name for p in PLAYGROUND_DIR.glob("*.js")}
    imported = {"app.js"} | {
        line.split('"./')[1].split('"')[0]
        for p in PLAYGROUND_DIR.glob("*.js")
        for line in p.read_text().splitlines()
        if line.startswith("import ") and '"./' in line
    }
    assert scripts == imported  # no stray script in the served folder
