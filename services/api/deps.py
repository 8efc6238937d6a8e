"""FastAPI dependency aliases: the long-lived objects on app.state, and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.api.auth import owner_of
from services.api.settings import ApiSettings
from services.api.streaming.hub import SessionHub


def _hub(request: Request) -> SessionHub:
    return request.app.state.hub


def _settings(request: Request) -> ApiSettings:
    return request.app.state.settings


Hub = Annotated[SessionHub, Depends(_hub)]
Settings = Annotated[ApiSettings, Depends(_settings)]
Owner = Annotated[str, Depends(owner_of)]
