"""Dependencies shared by the routers, as ``Annotated`` aliases.

All are ``async def`` although none awaits: FastAPI runs a plain ``def`` dependency in its
thread pool, and four thread hops per request cost more than the search itself (py-spy on a
loaded server, issue 18).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from indexer.collection import Collection
from service.engine import QueryEngine
from service.errors import UnavailableError
from service.security import Caller, authorise, identify
from service.settings import Scope, Settings
from service.state import ServiceState

COLLECTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def state_of(request: Request) -> ServiceState:
    state: ServiceState | None = getattr(request.app.state, "service", None)
    if state is None:
        raise UnavailableError("the service is starting")
    return state


async def get_state(request: Request) -> ServiceState:
    return state_of(request)


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_engine(state: StateDep) -> QueryEngine:
    return state.engine


async def get_settings(state: StateDep) -> Settings:
    return state.settings


EngineDep = Annotated[QueryEngine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def checked_caller(request: Request, state: ServiceState, scope: Scope) -> Caller:
    """Who calls, once authorised for ``scope`` and within the rate limit (401/403/429)."""
    who = identify(request, state.settings.api_keys)
    authorise(who, scope, state.settings)
    await state.limiter.check(who)
    return who


def _caller_with(scope: Scope) -> Callable[[Request, ServiceState], Awaitable[Caller]]:
    async def caller(request: Request, state: StateDep) -> Caller:
        return await checked_caller(request, state, scope)

    return caller


SearchCaller = Annotated[Caller, Depends(_caller_with("search"))]
WriteCaller = Annotated[Caller, Depends(_caller_with("write"))]
AdminCaller = Annotated[Caller, Depends(_caller_with("admin"))]

CollectionName = Annotated[
    str, Path(pattern=COLLECTION_NAME, description="collection name", examples=["images"])
]


async def served_collection(name: CollectionName, engine: EngineDep) -> Collection:
    return engine.collection(name)


CollectionDep = Annotated[Collection, Depends(served_collection)]


@dataclass(frozen=True)
class SearchContext:
    """What a search needs, resolved by one dependency instead of a tree of six: FastAPI's
    dependency solving was a third of a search request's event-loop time (issue 18)."""

    state: ServiceState
    collection: Collection
    caller: Caller

    @property
    def engine(self) -> QueryEngine:
        return self.state.engine

    @property
    def settings(self) -> Settings:
        return self.state.settings


async def search_context(request: Request, name: CollectionName) -> SearchContext:
    state = state_of(request)
    collection = state.engine.collection(name)  # 404/503 before 401/403, as the tree did
    return SearchContext(state, collection, await checked_caller(request, state, "search"))


SearchContextDep = Annotated[SearchContext, Depends(search_context)]
