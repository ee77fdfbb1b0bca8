"""The query-embedding cache: Redis when configured and up, else (and also) a small in-process
LRU. Keys hold the model bundle id, so a new model never reads the old model's vectors, and a
digest of the normalised query: for a text, the tokenizer's own cleaning (``clean_lower``), so
two texts share a key exactly when the model sees the same input; for an image, its bytes."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Literal

import numpy as np

from runtime.text import clean_lower
from service.metrics import Metrics
from service.redis_link import RedisLink

QueryKind = Literal["text", "image"]


def cache_key(bundle_id: str, kind: QueryKind, query: str | bytes) -> str:
    data = clean_lower(query).encode("utf-8") if isinstance(query, str) else query
    return f"cots:emb:{bundle_id}:{kind}:{hashlib.sha256(data).hexdigest()}"


class EmbeddingCache:
    def __init__(
        self, link: RedisLink, metrics: Metrics, *, dim: int, ttl_s: int, local_entries: int
    ) -> None:
        self.link = link
        self.metrics = metrics
        self.dim = dim
        self.ttl_s = ttl_s
        self.local_entries = local_entries
        self._local: OrderedDict[str, np.ndarray] = OrderedDict()

    async def get(self, key: str) -> np.ndarray | None:
        if key in self._local:
            self._local.move_to_end(key)
            self.metrics.cache.labels("local", "hit").inc()
            return self._local[key]
        if self.link.configured:
            raw = await self.link.call(lambda client: client.get(key))
            if isinstance(raw, bytes) and len(raw) == 4 * self.dim:
                self.metrics.cache.labels("redis", "hit").inc()
                vector = np.frombuffer(raw, dtype=np.float32).copy()
                self._remember(key, vector)
                return vector
            self.metrics.cache.labels("redis", "miss" if self.link.up else "error").inc()
        else:
            self.metrics.cache.labels("local", "miss").inc()
        return None

    async def put(self, key: str, vector: np.ndarray) -> None:
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        self._remember(key, vector)
        if self.link.configured:
            data = vector.tobytes()
            await self.link.call(lambda client: client.set(key, data, ex=self.ttl_s))

    def _remember(self, key: str, vector: np.ndarray) -> None:
        if self.local_entries == 0:
            return
        self._local[key] = vector
        self._local.move_to_end(key)
        while len(self._local) > self.local_entries:
            self._local.popitem(last=False)

    def clear_local(self) -> None:
        self._local.clear()
