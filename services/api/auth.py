"""API key check: ``Authorization: Bearer <key>`` against API_KEYS; the owner of a session is the key's
sha256 (the key itself is never stored or logged)."""

from __future__ import annotations

import hashlib

from fastapi import Request

from services.api.errors import Unauthorized


def owner_of(request: Request) -> str:
    """The caller's owner id: sha256 hex of its key, or "" when the service is open (API_KEYS unset)."""
    keys: frozenset[str] = request.app.state.key_hashes
    if not keys:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    digest = hashlib.sha256(token.encode()).hexdigest()
    if digest not in keys:
        raise Unauthorized("invalid API key")
    return digest
