"""Sharded collections served by Ray Serve, seen by the query engine as one collection.

``engine -> ShardedCollection.nearest_partial(queries, k) -> every shard's deployment at once
(handle calls; failed or slow ones sent again; shard_timeout_s) -> merge_shard_results ->
(scores, ids, missing shards) -> hydrate_partial -> items from the shards that own them``

A collection split by ``indexer.sharded`` has S shard collections; each is served by its own
Ray Serve deployment ``<collection>-shard-<i>`` of R replicas, at most one per node
(``service.shard_serve``). :class:`RayShards` opens a :class:`ShardedCollection` per version
over the link to that cluster (``service.shard_link.ShardLink``: joins it once, deploys a
collection's shards where none run, reads Serve's status).

Every shard holds distinct items, so each shard's top ``k`` (``k`` = offset + page, as the
engine asks) merged by score, ties by id, is the top ``k`` single-node search gives, pages
after the first included (``indexer.sharded.merge_shard_results``).

A sharded collection's version is the sum of its shards' live versions: it grows whenever one
of them changes, and the registry opens a new :class:`ShardedCollection` then (reading a few
``index.json`` files; the deployments stay). Each call names the shard version the router
read from disk, and a replica that has not polled it yet loads it before answering.

Faults: a call that fails (its replica's node died, the replica is restarting) is sent again,
and one still unanswered after a quarter of ``shard_timeout_s`` (a replica whose node died
but is not yet declared dead holds its calls) gets a twin; Serve routes either to a live
replica of the shard, and the first answer wins. A shard with no answer within
``shard_timeout_s`` (every replica gone) is missing: the engine answers without it and says
so (``partial``), or refuses with 503 and Retry-After when complete results are asked for.
Once a shard has missed a query and Serve's status (read every second) says it runs no
replica of it, calls to it are waited for a tenth of a second, not the whole timeout: a shard
that stays away does not slow every query down. Serve restarts the lost replicas on the
nodes that are left or come back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from indexer.collection import Collection
from indexer.errors import CollectionError, FilterError
from indexer.filters import Filter, as_filter
from indexer.index_bundle import IndexInfo, read_info
from indexer.metadata import Item
from indexer.segments import Hit, SegmentedIndex, hits_of
from indexer.sharded import (
    ShardedInfo,
    merge_shard_results,
    read_sharded,
    shard_name,
    shard_of,
    shard_root,
)
from indexer.versions import current_version, segments_dir, version_dir
from service.errors import UnavailableError
from service.shard_link import (
    REPLICA_CPUS,
    REPLICA_MAX_ONGOING,
    ShardLink,
    deployment_name,
    ray_address,
)

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle, DeploymentResponse

log = logging.getLogger("cots.shards")

# The link's names too, for the modules that name the router's (service.shard_app, state).
__all__ = [
    "REPLICA_CPUS",
    "REPLICA_MAX_ONGOING",
    "RETRY_AFTER_S",
    "RayShards",
    "ShardHits",
    "ShardedCollection",
    "ShardsUnavailableError",
    "deployment_name",
    "ray_address",
]

# Calls to one shard beyond the first, for one query: a failed call sent again, or a slow one
# doubled (Serve routes either to another replica when one is live).
EXTRA_CALLS: Final = 2
# A shard call unanswered after this share of shard_timeout_s is sent again beside the first.
HEDGE_AFTER: Final = 0.25
# With two calls out to one shard, each is waited for this long in turn.
POLL_S: Final = 0.005
# What a 503 for a missing shard asks the client to wait: of the order of what Serve takes to
# start a lost replica again where there is room for it (seconds).
RETRY_AFTER_S: Final = 5
# Up to this many results per query, shards send each result's item along with the ids (one
# round trip per search instead of two); deeper searches ask for the kept ids' items after.
INLINE_ITEMS: Final = 100
# How long a call to a shard Serve runs no replica of is waited for.
GONE_WAIT_S: Final = 0.1


def shard_versions(root: Path, name: str, shards: int) -> tuple[int, ...]:
    """Each shard's live version (CollectionError when one has none)."""
    folder = shard_root(root, name)
    versions = []
    for i in range(shards):
        version = current_version(folder, shard_name(i))
        if version is None:
            raise CollectionError(f"shard {i} of collection {name!r} has no live version")
        versions.append(version)
    return tuple(versions)


@dataclass(frozen=True)
class ShardHits:
    """The merged top k of the shards that answered, with -inf / -1 padding."""

    scores: np.ndarray  # [Q, k]
    ids: np.ndarray  # [Q, k]
    items: dict[int, Item]  # items of (some of) the ids, sent along by the shards
    missing: list[int]  # shards that did not answer


class ShardsUnavailableError(UnavailableError):
    """A call that needs every shard it names (an item's metadata, a stored vector) met a
    shard with no live replica."""

    def __init__(self, name: str, missing: Sequence[int]) -> None:
        shards = ", ".join(str(i) for i in missing)
        super().__init__(
            f"shard {shards} of collection {name!r} did not answer (no live replica); "
            f"retry after {RETRY_AFTER_S} s",
            retry_after=RETRY_AFTER_S,
        )
        self.missing = list(missing)


class RayShards(ShardLink):
    """The link to the Ray cluster, and what the registry calls to serve a sharded
    collection (``service.registry.ShardedOpener``)."""

    def open(self, root: Path, name: str, previous: Collection | None) -> Collection:
        """The sharded collection ``name`` at its shards' live versions: ``previous`` itself
        when they have not changed, else a new :class:`ShardedCollection`."""
        sharded = read_sharded(root, name)
        if sharded.model_bundle_id != self.bundle_id:
            raise CollectionError(
                f"collection {name!r} was built with model bundle {sharded.model_bundle_id[:12]}, "
                f"but queries are embedded with {self.bundle_id[:12]}; serve that bundle or "
                "rebuild the collection with this one"
            )
        versions = shard_versions(root, name, sharded.shards)
        if isinstance(previous, ShardedCollection) and previous.shard_versions == versions:
            return previous
        infos = [
            read_info(version_dir(shard_root(root, name), shard_name(i), v))
            for i, v in enumerate(versions)
        ]
        handles = self.handles(root, name, sharded)
        return ShardedCollection(root, name, sharded, infos, versions, handles, self)


class ShardedCollection(Collection):
    """One version of a sharded collection (each shard at a version), answering as the
    :class:`~indexer.collection.Collection` of all its items would; ``nearest_partial`` and
    ``hydrate_partial`` also say which shards did not answer."""

    def __init__(
        self,
        root: Path,
        name: str,
        sharded: ShardedInfo,
        infos: Sequence[IndexInfo],
        versions: tuple[int, ...],
        handles: Sequence[DeploymentHandle],
        link: ShardLink,
    ) -> None:
        # Not Collection.__init__: nothing of the shards is opened in this process.
        self.folder = Path(root) / name
        self.root = Path(root)
        self.name = name
        self.sharded = sharded
        self.shard_infos = list(infos)
        self.shard_versions = versions
        self.info = joined_info(name, sharded, infos)
        self.segments = SegmentedIndex([], np.zeros(0, dtype=np.int64))  # none held here
        self.version = sum(versions)
        self.loaded: list[str] = []
        self._size: int | None = None
        self.handles = list(handles)
        self.link = link

    @property
    def shards(self) -> int:
        return self.sharded.shards

    # Asking the shards ---------------------------------------------------------------------

    def _send(self, shard: int, method: str, args: tuple[Any, ...]) -> DeploymentResponse:
        return getattr(self.handles[shard], method).remote(*args, self.shard_versions[shard])

    def _ask(
        self, method: str, calls: Mapping[int, tuple[Any, ...]]
    ) -> tuple[dict[int, Any], list[int]]:
        """(each shard's answer to ``method(*args, version)``, the shards with none): every
        call sent at once and waited for until ``timeout_s`` from now (see :meth:`_first`).
        Errors of the query itself (a bad filter) are raised as the replica raised them."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:  # on an event loop's thread: Serve's blocking wait refuses to run here
            return self.link.pool.submit(self._ask, method, calls).result()
        start = time.monotonic()
        timeout = self.link.timeout_s
        sent = {i: [self._send(i, method, args)] for i, args in calls.items()}
        answers: dict[int, Any] = {}
        missing: list[int] = []
        for shard, live in sent.items():
            hedge_at, deadline = start + timeout * HEDGE_AFTER, start + timeout
            if self.link.is_away(self.name, shard):
                # Missed before, and Serve says it runs no replica: waited for briefly, not
                # the whole timeout, which every query would pay, one batch at a time, while
                # the shard's node is away. (A shard still starting is waited for.)
                hedge_at = deadline = start + min(timeout, GONE_WAIT_S)
            answered, answer, why = self._first(
                shard, method, calls[shard], live, hedge_at, deadline
            )
            self.link.note(self.name, shard, answered=answered, why=why)
            if answered:
                answers[shard] = answer
            else:
                missing.append(shard)
        return answers, sorted(missing)

    def _first(
        self,
        shard: int,
        method: str,
        args: tuple[Any, ...],
        live: list[DeploymentResponse],
        hedge_at: float,
        deadline: float,
    ) -> tuple[bool, Any, str]:
        """(answered, the first answer of the calls ``live`` to ``shard``, why none came).

        A call that fails (its replica died) is sent again, and Serve routes it to a live
        replica; a call still unanswered at ``hedge_at`` gets a twin (a replica on a node that
        just died can hold a call until Ray declares the node dead, which takes longer than
        a query may wait), and the first answer of either wins. At most EXTRA_CALLS more calls
        in all; the rest are cancelled at the deadline."""
        extra = 0
        why = f"no answer within {self.link.timeout_s:g} s"
        late = False
        while live and not late:
            now = time.monotonic()
            # Past the deadline (spent waiting for other shards): one last look, no wait.
            late = now >= deadline
            if extra == 0 and hedge_at <= now < deadline:
                live.append(self._send(shard, method, args))
                extra += 1
            # One call out: wait for it (until the hedge, then the deadline). Several: a short
            # turn each, so that whichever answers first is seen.
            turn = POLL_S if len(live) > 1 else (hedge_at if extra == 0 else deadline) - now
            for response in list(live):
                wait = max(min(turn, deadline - time.monotonic()), 0.001)
                try:
                    return True, response.result(timeout_s=wait), ""
                except TimeoutError:  # ray's GetTimeoutError is one too
                    continue
                except Exception as error:
                    cause = getattr(error, "cause", None)  # a RayTaskError: the replica raised
                    if isinstance(cause, FilterError | ValueError):
                        raise cause from None
                    failed = cause or error
                    why = f"{type(failed).__name__}: {str(failed)[:200]}"
                    live.remove(response)
                    if extra < EXTRA_CALLS and time.monotonic() < deadline:
                        live.append(self._send(shard, method, args))
                        extra += 1
        for response in live:
            response.cancel()
        return False, None, why

    def _owned(self, ids: np.ndarray) -> dict[int, np.ndarray]:
        """``ids`` by the shard that owns them (shards with none left out)."""
        owners = shard_of(ids, self.shards)
        return {i: ids[owners == i] for i in range(self.shards) if (owners == i).any()}

    # The Collection interface --------------------------------------------------------------

    def nearest_items(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> ShardHits:
        """:meth:`nearest` over the shards that answered, the shards that did not, and (for
        ``k`` up to INLINE_ITEMS) the items of the ids, sent along by the shards: the hits
        then need no second round trip (:meth:`hydrate_partial` with ``known``)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise ValueError(f"queries must be [n, {self.info.dim}], got {queries.shape}")
        filters_json = _filters_json(filters)
        inline = k <= INLINE_ITEMS
        calls = {i: (queries, k, filters_json, rescore, inline) for i in range(self.shards)}
        answers, missing = self._ask("nearest", calls)
        items: dict[int, Item] = {}
        for answer in answers.values():
            items.update(answer[2] or {})
        parts = [answers[i][:2] for i in sorted(answers)]
        if not parts:
            empty = np.full((len(queries), k), -np.inf, dtype=np.float32)
            return ShardHits(empty, np.full((len(queries), k), -1, dtype=np.int64), items, missing)
        scores, ids = merge_shard_results(parts, k)
        return ShardHits(scores, ids, items, missing)

    def nearest_partial(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """:meth:`nearest` over the shards that answered, and the shards that did not."""
        found = self.nearest_items(queries, k, filters=filters, rescore=rescore)
        return found.scores, found.ids, found.missing

    def nearest(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` over every shard; :class:`ShardsUnavailableError` when one is missing."""
        scores, ids, missing = self.nearest_partial(queries, k, filters=filters, rescore=rescore)
        if missing:
            raise ShardsUnavailableError(self.name, missing)
        return scores, ids

    def hydrate_partial(
        self,
        scores: np.ndarray,
        ids: np.ndarray,
        k: int,
        known: Mapping[int, Item] | None = None,
    ) -> tuple[list[list[Hit]], list[int]]:
        """Up to ``k`` hits per row, and the shards that did not answer (their hits left
        out). Items in ``known`` (sent along with the ids) are not asked for again."""
        items = dict(known or {})
        wanted = np.unique(ids[ids >= 0])
        wanted = wanted[[int(i) not in items for i in wanted]] if items else wanted
        missing: list[int] = []
        if len(wanted):
            calls = {i: (mine,) for i, mine in self._owned(wanted).items()}
            answers, missing = self._ask("items", calls)
            for found, _ in answers.values():
                items.update(found)
        return hits_of(scores, ids, items, k), missing

    def hydrate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        hits, missing = self.hydrate_partial(scores, ids, k)
        if missing:
            raise ShardsUnavailableError(self.name, missing)
        return hits

    def get(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        wanted = np.asarray(ids, dtype=np.int64)
        answers, missing = self._ask("items", {i: (m,) for i, m in self._owned(wanted).items()})
        if missing:
            raise ShardsUnavailableError(self.name, missing)
        items: dict[int, Item] = {}
        for found, _ in answers.values():
            items.update(found)
        return [items.get(int(i)) for i in wanted]

    def stored_vectors(self, ids: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        wanted = np.asarray(ids, dtype=np.int64)
        calls = {i: (m,) for i, m in self._owned(wanted).items()}
        answers, missing = self._ask("stored_vectors", calls)
        if missing:
            raise ShardsUnavailableError(self.name, missing)
        found: dict[int, np.ndarray] = {}
        for vectors, _ in answers.values():
            found.update(vectors)
        return found

    def ids_matching(self, filters: Filter | Mapping[str, Any] | None) -> np.ndarray:
        calls = {i: (_filters_json(filters),) for i in range(self.shards)}
        answers, missing = self._ask("ids_matching", calls)
        if missing:
            raise ShardsUnavailableError(self.name, missing)
        return np.sort(np.concatenate([ids for ids, _ in answers.values()]))

    def replicas(self) -> list[dict[str, Any]]:
        """Where each shard's answering replica runs (one call per shard; for operators)."""
        answers, _ = self._ask("describe", {i: () for i in range(self.shards)})
        return [answers[i] for i in sorted(answers)]

    def size_bytes(self) -> int:
        """Bytes on disk of every shard's live version and its segments."""
        if self._size is None:
            folder = shard_root(self.root, self.name)
            total = 0
            for i, (info, version) in enumerate(
                zip(self.shard_infos, self.shard_versions, strict=True)
            ):
                shard = shard_name(i)
                folders = [version_dir(folder, shard, version)]
                folders += [segments_dir(folder, shard) / s for s in info.segments]
                total += sum(p.stat().st_size for f in folders for p in f.iterdir() if p.is_file())
            self._size = total
        return self._size

    def close(self) -> None:
        """Nothing to release here: the shards' replicas outlive a version of the router."""


def joined_info(name: str, sharded: ShardedInfo, infos: Sequence[IndexInfo]) -> IndexInfo:
    """One ``index.json`` for the whole collection: counts summed over the shards, the
    worst shard's recall."""
    skipped: Counter[str] = Counter()
    for info in infos:
        skipped.update(info.skipped)
    return infos[0].model_copy(
        update={
            "collection": name,
            "count": sum(info.count for info in infos),
            "live": sum(info.live for info in infos),
            "recall_at_10": min(info.recall_at_10 for info in infos),
            "skipped": dict(skipped),
            "created": sharded.created,
            "segments": [],
            "tombstones": sum(info.tombstones for info in infos),
            "max_id": max(info.max_id for info in infos),
            "files": {},
        }
    )


def _filters_json(filters: Filter | Mapping[str, Any] | None) -> str:
    """Filters as canonical JSON ("" for none): what a replica reads back with as_filter."""
    parsed = as_filter(filters)
    return json.dumps(parsed.canonical(), sort_keys=True) if parsed is not None else ""
