"""Everything one running app holds, built in its lifespan and torn down after it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import faiss

from indexer.home import bundle_of_collections
from runtime.encoder import Encoder
from service.cache import EmbeddingCache
from service.engine import QueryEngine
from service.jobs import JobRunner
from service.metrics import Metrics
from service.redis_link import RedisLink
from service.registry import CollectionRegistry
from service.security import RateLimiter
from service.settings import Settings
from service.shard_router import RayShards, ray_address
from service.updates import VersionWatcher

log = logging.getLogger("cots.service")


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    encoder: Encoder
    bundle: Path  # settings.bundle, or the one the collections were built with
    registry: CollectionRegistry
    link: RedisLink
    cache: EmbeddingCache
    engine: QueryEngine
    limiter: RateLimiter
    jobs: JobRunner
    watcher: VersionWatcher

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics) -> ServiceState:
        # Unset thread counts follow the cores this process may use (taskset, a container's
        # cpuset), not the machine's: a pool wider than its cores only contends with itself.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        faiss_threads = settings.faiss_threads or cores
        if faiss_threads is not None:
            faiss.omp_set_num_threads(faiss_threads)
        bundle = settings.bundle or bundle_of_collections(settings.index_root, settings.collections)
        encoder = Encoder(
            bundle,
            providers=settings.providers or None,
            precision=settings.precision,
            threads=settings.threads or cores,
            max_pixels=settings.limits.max_image_pixels,
            spin=settings.spin,
        )
        for modality in ("text", "image"):  # sessions now, not on the first query
            encoder.session(modality)
        address = ray_address(settings.ray_address)
        shards = None
        if address is not None:  # sharded collections: joined to Ray when the first is opened
            shards = RayShards(
                address,
                bundle_id=encoder.bundle_id,
                timeout_s=settings.shard_timeout_s,
                poll_s=settings.reload_poll_s,
                mmap=settings.mmap,
                rescore=settings.rescore,
            )
        registry = CollectionRegistry(
            settings.index_root,
            encoder.bundle_id,
            metrics,
            names=settings.collections,
            use_gpu=settings.gpu_faiss,
            mmap=settings.mmap,
            rescore=settings.rescore,
            shards=shards,
        )
        registry.refresh()
        link = RedisLink(settings.redis_url, metrics)
        await link.start()
        cache = EmbeddingCache(
            link,
            metrics,
            dim=encoder.dim,
            ttl_s=settings.cache_ttl_s,
            local_entries=settings.local_cache_entries,
        )
        engine = QueryEngine(settings, encoder, registry, cache, metrics)
        engine.start()
        watcher = VersionWatcher(registry, settings.redis_url, poll_s=settings.reload_poll_s)
        watcher.start()
        state = cls(
            settings=settings,
            metrics=metrics,
            encoder=encoder,
            bundle=bundle,
            registry=registry,
            link=link,
            cache=cache,
            engine=engine,
            limiter=RateLimiter(link, settings.rate_limit_per_minute, settings.rate_limit_window_s),
            jobs=JobRunner(registry, settings.redis_url),
            watcher=watcher,
        )
        log.info(
            "serving bundle %s with collections %s",
            encoder.manifest.short_id,
            ", ".join(f"{n} v{c.version}" for n, c in registry.loaded().items()) or "none",
        )
        return state

    async def stop(self) -> None:
        self.watcher.stop()
        await self.engine.stop()
        self.jobs.close()
        await self.link.close()
        self.registry.close()
        if isinstance(self.registry.shards, RayShards):
            self.registry.shards.close()
