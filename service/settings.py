"""The service's settings: one pydantic-settings model, read from ``COTS_*`` environment
variables (nested groups with ``__``, e.g. ``COTS_BATCH__MAX_WAIT_MS=2``) or a ``.env`` file."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from indexer.home import DEFAULT_INDEX_ROOT

Scope = Literal["search", "write", "admin"]


class BatchSettings(BaseModel):
    """Cross-request dynamic batching of encoder and FAISS calls."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="off: every query is encoded and searched alone")
    max_batch: int = Field(32, ge=1, le=1024, description="queries per encoder or FAISS call")
    max_wait_ms: float = Field(
        3.0, ge=0, le=1000, description="how long the first query of a batch waits for others"
    )
    max_queue: int = Field(
        512, ge=1, description="queries waiting per stage before new ones get 503 Retry-After"
    )
    lone_inline: bool = Field(
        True,
        description="a query with no other in flight runs on the event loop's thread, not the "
        "batch worker's: no thread hop (~0.7 ms less at concurrency 1 on 2 cores), while the "
        "loop waits for that one model call (docs/bench/serve.md)",
    )


class LimitSettings(BaseModel):
    """Bounds on what one request may ask for."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(10 * 2**20, ge=1024, description="request body size")
    max_image_pixels: int = Field(16_000_000, ge=1, description="decoded image width x height")
    max_text_chars: int = Field(1000, ge=1, description="characters per query text")
    max_k: int = Field(1000, ge=1, description="results per page")
    max_offset: int = Field(10_000, ge=0, description="results skipped by paging")
    max_batch_inputs: int = Field(64, ge=1, description="texts or images per embed request")


class ApiKey(BaseModel):
    """A key as stored in settings: its SHA-256, never the key itself."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="who holds the key (logs, metrics, rate limit)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: list[Scope] = Field(default_factory=lambda: list[Scope](["search"]))

    @staticmethod
    def hash(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Settings(BaseSettings):
    """Everything ``cots serve`` can be told. Paths are on the server."""

    model_config = SettingsConfigDict(
        env_prefix="COTS_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    bundle: Path | None = Field(
        None,
        description="model bundle (cots export); unset: the one the served collections were "
        "built with, when they agree on one",
    )
    index_root: Path = Field(
        DEFAULT_INDEX_ROOT,
        description="folder of collections, shared with every cots index command",
    )
    collections: list[str] = Field(
        default_factory=list, description="collections to serve (empty: every one under the root)"
    )
    data_root: Path | None = Field(
        None,
        description="the only folder whose files add-items and re-index requests may name",
    )
    redis_url: str | None = Field(None, description="Redis for cache, jobs and hot swap")
    providers: list[str] = Field(default_factory=list, description="ONNX Runtime providers")
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto",
        description="query encoder precision: auto is fp16 on a GPU provider, fp32 on the CPU; "
        "int8 (bundles exported with --int8) is faster on the CPU once its recall has been "
        "measured for the model (cots bench encode; deploy/README.md)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="ONNX Runtime intra-op threads (unset: one per core this process may use)",
    )
    faiss_threads: int | None = Field(
        None, ge=1, description="FAISS (OpenMP) threads (unset: one per core this process may use)"
    )
    spin: bool = Field(
        False,
        description="let ONNX Runtime's threads spin between calls: a little lower latency, "
        "much more CPU per query (docs/bench/serve.md)",
    )
    gpu_faiss: bool | None = Field(
        None, description="FAISS indices on the GPU (unset: when FAISS sees one)"
    )
    fast_search: bool = Field(
        True,
        description="answer valid JSON searches without FastAPI's routing and validation "
        "(the same work and answers; a cached search 1.64 ms against 2.13 ms in process on "
        "2 cores, docs/bench/serve.md); "
        "off: every request takes the routed path",
    )
    mmap: bool = Field(
        True,
        description="serve segments' FAISS data, ids and stored vectors memory-mapped: replicas "
        "on one host share one copy in the page cache and start without reading whole files "
        "(off: each replica reads its own copy into RAM)",
    )
    rescore: int | None = Field(
        None,
        ge=1,
        le=64,
        description="compressed indexes (PQ, SQ8; SQfp16 codes are as precise as the stored "
        "copy) fetch k x rescore candidates and rescore them exactly with the segment's stored "
        "fp16 vectors (unset: by segment size, 4 up to 200k vectors, 16 up to 2M, 32 beyond, "
        "as measured in docs/bench/scale.md; 1: the codes' own scores)",
    )
    ray_address: str | None = Field(
        None,
        description="the Ray cluster that serves sharded collections (cots index shard), e.g. "
        "ray://head:10001 or auto; unset: RAY_ADDRESS, else sharded collections are not served",
    )
    shard_timeout_s: float = Field(
        2.0,
        gt=0,
        description="how long a query waits for one shard before answering without it "
        "(partial) or failing (complete results asked for)",
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    api_keys: list[ApiKey] = Field(
        default_factory=list, description="keys for writes and admin (none: both refused)"
    )
    search_requires_key: bool = Field(False, description="refuse anonymous searches")
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="requests per key (or client address) per window (a minute unless "
        "rate_limit_window_s says otherwise); 0: no limit",
    )
    rate_limit_window_s: int = Field(
        60,
        ge=1,
        le=3600,
        description="the rate limit's window in seconds (a per-second burst limit: 1)",
    )
    cache_ttl_s: int = Field(24 * 3600, ge=1, description="query-embedding cache entry lifetime")
    local_cache_entries: int = Field(10_000, ge=0, description="in-process cache size")
    url_fetch_allowlist: list[str] = Field(
        default_factory=list,
        description="hosts whose image URLs the server may fetch (empty: no fetching)",
    )
    reload_poll_s: float = Field(
        5.0, gt=0, description="how often the live version pointers are re-read"
    )
    thumbnail_dir: Path | None = Field(
        None,
        description="where media thumbnails (?w=N) are cached (unset: .thumbnails in the "
        "index root; not writable: served uncached)",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins whose web pages may call the API, as a JSON list "
        '(["https://app.example.com"]; "*" for any; empty: no cross-origin calls)',
    )


# COTS_* variables of the tools around the service (scripts, compose files, tests, the client),
# which are no settings of it.
OTHER_VARIABLES: Final = frozenset(
    {
        "COTS_API_KEY",
        "COTS_CHROMIUM",
        "COTS_COMPOSE",
        "COTS_CONTAINER_ENGINE",
        "COTS_CUDA_IMAGE",
        "COTS_DEMO_OPTIONS",
        "COTS_GATEWAY_IMAGE",
        "COTS_GATEWAY_RESOLVER",
        "COTS_GATEWAY_UPSTREAM",
        "COTS_HEALTHCHECK_URL",
        "COTS_IMAGE",
        "COTS_PORT",
        "COTS_PROMETHEUS_PORT",
        "COTS_RAY_API_MEMORY",
        "COTS_RAY_ENCODERS",
        "COTS_RAY_HEAD_MEMORY",
        "COTS_RAY_IMAGE",
        "COTS_RAY_PORT",
        "COTS_RAY_WORKER_MEMORY",
        "COTS_REDIS_SERVER",
        "COTS_TEST_MARKER",
        "COTS_TRAINING_IMAGE",
        "COTS_URL",
        "COTS_VARIANT",
        "COTS_VENV",
        "COTS_WRK",
    }
)


def setting_variables() -> list[str]:
    """Every variable that sets something: COTS_<FIELD>, and COTS_<GROUP>__<FIELD> for the
    fields of a group (batch, limits)."""
    names = []
    for name, field in Settings.model_fields.items():
        names.append(f"COTS_{name.upper()}")
        group = field.annotation
        if isinstance(group, type) and issubclass(group, BaseModel):
            names += [f"COTS_{name.upper()}__{inner.upper()}" for inner in group.model_fields]
    return names


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``COTS_*`` variables in ``environ`` that set nothing, each with the variable it most
    likely meant (None: none is close): pydantic-settings ignores them, so a misspelt one
    would pass unseen."""
    known = setting_variables()
    found = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith("COTS_") or upper in OTHER_VARIABLES or upper in known:
            continue
        # Compared without the prefix every candidate shares, which would make all look alike.
        close = difflib.get_close_matches(upper[5:], [name[5:] for name in known], 1, 0.75)
        found.append((variable, f"COTS_{close[0]}" if close else None))
    return found
