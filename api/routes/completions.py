"""/v1/chat/completions, /v1/completions and /v1/models, as the `openai` client expects them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep, TenantDep
from gemma_batch.completions import complete
from gemma_batch.model_cache import prepared_names
from gemma_batch.openai_schemas import CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions")
async def chat_completions(
    body: CompletionRequest, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    """Answered by the workers through the job queue, ahead of batch work."""
    return await complete(body, "/v1/chat/completions", settings, tenant)


@router.post("/completions")
async def completions(
    body: CompletionRequest, settings: SettingsDep, tenant: TenantDep
) -> dict[str, Any]:
    return await complete(body, "/v1/completions", settings, tenant)


@router.get("/models")
def models(settings: SettingsDep) -> dict[str, Any]:
    """The models prepared here, which the workers can serve."""
    names = prepared_names(settings.model_dir)
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "gemma-batch"} for n in names]
    return {"object": "list", "data": data}
