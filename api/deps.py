"""Dependencies shared by the routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import tenant_of
from gemma_batch.errors import Unauthorized
from gemma_batch.settings import Settings, get_settings
from gemma_batch.store.sessions import session_scope
from gemma_batch.store.tables import DEFAULT_TENANT

# auto_error off: a missing key gets the project's own 401 body, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key from `gemma-batch keys create`.")


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


async def _settings() -> Settings:
    # A cached read: async, so that it runs on the event loop, not on a trip to the thread pool
    # that FastAPI gives every sync dependency.
    return get_settings()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(_settings)]


def current_tenant(
    session: SessionDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """The tenant whose API key came with the request (the default tenant while auth is off)."""
    if not settings.auth:
        return DEFAULT_TENANT
    tenant = tenant_of(session, credentials.credentials) if credentials else None
    if tenant is None:
        raise Unauthorized()
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]
