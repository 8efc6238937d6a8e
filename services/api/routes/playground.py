"""The browser playground: ``GET /`` (the page) and ``GET /playground/{name}`` (its scripts, styles, icon).

The files live in ``services/api/playground/`` and are served as they are (no build step). Every answer
carries a strict Content-Security-Policy: scripts and styles only from this origin (no inline script or style,
no eval), requests only to this origin, images and media from this origin or the page's own data:/blob: URLs,
no framing. Only plain files directly in that folder with a known suffix are served; anything else is the
usual 404 in the OpenAI error shape. The routes are not in the OpenAPI document (``include_in_schema=False``).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from services.api.errors import NotFound

router = APIRouter()

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
ASSET_PREFIX = "/playground/"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}\.[a-z]{2,4}$")


def asset_path(name: str, directory: Path = PLAYGROUND_DIR) -> Path | None:
    """The file ``name`` names in ``directory`` when it may be served (a plain file there, a known suffix,
    a name of lower-case letters, digits, ``-`` and ``_``), else None. Never follows a path outside it."""
    if not _ASSET_NAME.match(name) or Path(name).suffix not in MEDIA_TYPES:
        return None
    path = directory / name
    return path if path.is_file() and not path.is_symlink() else None


def _file(path: Path, media_type: str) -> FileResponse:
    return FileResponse(path, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The playground page (HTML)."""
    return _file(PLAYGROUND_DIR / "index.html", "text/html; charset=utf-8")


@router.get(ASSET_PREFIX + "{name}", include_in_schema=False)
async def asset(name: str) -> FileResponse:
    """One of the page's assets; 404 (OpenAI error JSON) for anything that is not one."""
    path = asset_path(name)
    if path is None:
        raise NotFound("unknown route")
    return _file(path, MEDIA_TYPES[path.suffix])
