"""``cots serve``: the search API and page with uvicorn."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from service.settings import Settings


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle [COTS_BUNDLE].")
@click.option(
    "--index-root", type=click.Path(path_type=Path), help="Collections folder [COTS_INDEX_ROOT]."
)
@click.option(
    "--collection",
    "collections",
    multiple=True,
    help="A collection to serve (repeatable; default: all under the root) [COTS_COLLECTIONS].",
)
@click.option("--redis-url", help="Redis for cache, jobs and hot swap [COTS_REDIS_URL].")
@click.option(
    "--ray-address",
    help="The Ray cluster serving sharded collections' shards, e.g. ray://head:10001 "
    "[COTS_RAY_ADDRESS, else RAY_ADDRESS].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to bind.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="uvicorn worker processes (each loads the model and indices); unless COTS_THREADS or "
    "COTS_FAISS_THREADS say otherwise, each gets an equal share of the cores.",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "fp16", "int8"]),
    help="Query encoder precision [COTS_PRECISION; default auto: fp16 on a GPU, else fp32].",
)
@click.option("--no-batching", is_flag=True, help="Encode and search every query alone.")
@click.option("--hash-key", metavar="KEY", help="Print the SHA-256 of KEY for COTS_API_KEYS, exit.")
def serve(
    bundle: Path | None,
    index_root: Path | None,
    collections: tuple[str, ...],
    redis_url: str | None,
    ray_address: str | None,
    host: str,
    port: int,
    workers: int,
    precision: str | None,
    no_batching: bool,
    hash_key: str | None,
) -> None:
    """Serve search over the collections of --index-root with the model of --bundle.

    Every setting also comes from COTS_* environment variables (or a .env file): batching
    (COTS_BATCH__MAX_BATCH, COTS_BATCH__MAX_WAIT_MS, COTS_BATCH__MAX_QUEUE), limits
    (COTS_LIMITS__MAX_K, ...), API keys (COTS_API_KEYS='[{"name": "ops", "sha256": "...",
    "scopes": ["write", "admin"]}]'), COTS_RATE_LIMIT_PER_MINUTE, COTS_DATA_ROOT,
    COTS_URL_FETCH_ALLOWLIST, COTS_CORS_ORIGINS (web apps on these origins may call the API:
    '["https://app.example.com"]') and COTS_THUMBNAIL_DIR. Sharded collections (cots index
    shard) are searched on the Ray cluster of --ray-address, each shard waited for at most
    COTS_SHARD_TIMEOUT_S. Options given here win over the environment.

    The page is at /, the API under /v1 (OpenAPI docs at /docs), clip-retrieval's API at
    /knn-service, probes at /healthz and /readyz, Prometheus metrics at /metrics.
    """
    from service.settings import ApiKey

    if hash_key is not None:
        click.echo(ApiKey.hash(hash_key))
        return
    overrides = {
        "COTS_BUNDLE": str(bundle) if bundle else None,
        "COTS_INDEX_ROOT": str(index_root) if index_root else None,
        "COTS_COLLECTIONS": json.dumps(list(collections)) if collections else None,
        "COTS_REDIS_URL": redis_url,
        "COTS_RAY_ADDRESS": ray_address,
        "COTS_BATCH__ENABLED": "false" if no_batching else None,
        "COTS_PRECISION": precision,
    }
    overrides |= _thread_shares(workers)
    # Settings travel by environment so that every uvicorn worker process reads the same.
    os.environ.update({key: value for key, value in overrides.items() if value is not None})
    from pydantic import ValidationError

    from service.settings import Settings, unknown_variables

    try:
        settings = Settings()
    except ValidationError as error:
        raise click.ClickException(f"invalid settings:\n{error}") from None
    for variable, meant in unknown_variables(os.environ):
        hint = f" (did you mean {meant}?)" if meant else ""
        click.echo(f"warning: {variable} sets nothing and is ignored{hint}", err=True)
    _check_home(settings)
    import uvicorn

    click.echo(f"serving on http://{host}:{port}/ (API docs: http://{host}:{port}/docs)", err=True)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=False,
    )


def _check_home(settings: Settings) -> None:
    """Fail before uvicorn starts, naming the command that fixes it, when there is nothing to
    serve; an unset bundle becomes the one the collections were built with (COTS_BUNDLE, so
    every worker process reads the same)."""
    from indexer.errors import IndexerError
    from indexer.home import bundle_of_collections

    root = settings.index_root
    if settings.bundle is not None and not settings.bundle.exists():
        raise click.ClickException(
            f"model bundle {settings.bundle} does not exist: write one with `cots export` "
            "(or `cots quickstart FOLDER --model NAME --pretrained WEIGHTS`), or leave "
            "--bundle out to use the one the collections were built with"
        )
    try:
        bundle = settings.bundle or bundle_of_collections(root, settings.collections)
    except IndexerError as error:
        raise click.ClickException(str(error)) from None
    os.environ["COTS_BUNDLE"] = str(bundle)


def _thread_shares(workers: int) -> dict[str, str | None]:
    """COTS_THREADS and COTS_FAISS_THREADS for ``workers`` processes that split the cores
    (each would otherwise start a thread per core, and N workers would oversubscribe N-fold);
    settings already in the environment win."""
    if workers == 1:
        return {}
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    return {key: share for key in ("COTS_THREADS", "COTS_FAISS_THREADS") if key not in os.environ}
