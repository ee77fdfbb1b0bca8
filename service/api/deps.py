"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Path, Request

from indexer.collection import Collection
from service.engine import QueryEngine
from service.errors import ApiError
from service.security import Caller, authorise, identify
from service.settings import Scope, Settings
from service.state import ServiceState

COLLECTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def get_state(request: Request) -> ServiceState:
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise ApiError(503, "the service is starting")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_engine(state: StateDep) -> QueryEngine:
    return state.engine


def get_settings(state: StateDep) -> Settings:
    return state.settings


EngineDep = Annotated[QueryEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _caller_with(scope: Scope) -> Callable[[Request, ServiceState], Awaitable[Caller]]:
    async def caller(request: Request, state: StateDep) -> Caller:
        who = identify(request, state.settings.api_keys)
        authorise(who, scope, state.settings)
        await state.limiter.check(who)
        return who

    return caller


SearchCaller = Annotated[Caller, Depends(_caller_with("search"))]
WriteCaller = Annotated[Caller, Depends(_caller_with("write"))]
AdminCaller = Annotated[Caller, Depends(_caller_with("admin"))]

CollectionName = Annotated[
    str, Path(pattern=COLLECTION_NAME, description="collection name", examples=["images"])
]


def served_collection(name: CollectionName, engine: EngineDep) -> Collection:
    return engine.collection(name)


CollectionDep = Annotated[Collection, Depends(served_collection)]
