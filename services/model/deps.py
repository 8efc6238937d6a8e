"""Typed access to the long-lived objects the lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from services.model.generations import GenerationRegistry
from services.model.lifecycle import ModelService


def get_service(request: Request) -> ModelService:
    return request.app.state.service


def get_registry(request: Request) -> GenerationRegistry:
    return request.app.state.service.registry


ServiceDep = Annotated[ModelService, Depends(get_service)]
RegistryDep = Annotated[GenerationRegistry, Depends(get_registry)]
