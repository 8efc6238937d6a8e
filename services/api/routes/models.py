"""GET /v1/models: the one served model, in the OpenAI list shape."""

from __future__ import annotations

from fastapi import APIRouter, Request

from services.api.deps import Hub, Owner
from services.api.errors import NotFound
from services.api.openai_schemas import ModelCard, ModelList

router = APIRouter()


async def _card(request: Request, hub: Hub) -> ModelCard:
    # The replica's own id wins (it knows what it loaded); MODEL_REPO_ID when none answers.
    model = await hub.model.served_model() or hub.settings.model_repo_id
    return ModelCard(id=model, created=int(request.app.state.started_at))


@router.get("/v1/models")
async def list_models(request: Request, hub: Hub, _owner: Owner) -> ModelList:
    return ModelList(data=[await _card(request, hub)])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, hub: Hub, _owner: Owner) -> ModelCard:
    card = await _card(request, hub)
    if model_id != card.id:
        raise NotFound(f"model {model_id!r} not found", param="model", code="model_not_found")
    return card
