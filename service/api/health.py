"""Liveness, readiness and Prometheus metrics (outside /v1: probes and scrapers use these)."""

from __future__ import annotations

import os
import socket

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (says nothing of models or indices); names the replica, so that
    whoever runs several behind a load balancer can see which one answered. (async: a plain
    function would run in the threadpool, a hop the floor of ``cots bench serve`` should not
    pay.)"""
    return Health(status="ok", replica=socket.gethostname())


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(request: Request) -> JSONResponse:
    """Ready: the model bundle and every collection are loaded. Degraded (200, still serving):
    some collection cannot be loaded (``unavailable`` names each and why), or Redis is
    configured and not answering (search works without the cache). Unready (503): starting,
    or no collection loads, so that a gateway keeps a replica with one bad collection out of
    rotation only when it can serve nothing."""
    state = getattr(request.app.state, "service", None)
    if state is None:
        body = Readiness(
            status="unready",
            process=os.getpid(),
            model_bundle_id="",
            redis="disabled",
            collections={},
            unavailable={"*": "starting"},
        )
        return JSONResponse(body.model_dump(), status_code=503)
    loaded = state.registry.loaded()
    unavailable = state.registry.unavailable()
    ready = bool(loaded)
    degraded = bool(unavailable) or state.link.state == "down"
    status = "unready" if not ready else ("degraded" if degraded else "ready")
    body = Readiness(
        status=status,
        process=os.getpid(),
        model_bundle_id=state.encoder.bundle_id,
        redis=state.link.state,
        collections={name: collection.version for name, collection in loaded.items()},
        unavailable=unavailable if loaded or unavailable else {"*": "no collection to serve"},
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics of this replica."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
