"""Sharded collections: one collection split by id into S shard collections.

``<index root>/<name>/sharded.json`` says the collection is sharded (:func:`is_sharded` is the
switch every command checks) and ``<index root>/<name>/shards/`` is an index root of its own
that holds S normal collections, ``shard-0`` ... ``shard-{S-1}``: versions, segments, delete
sets, compaction and the ``current`` pointer are each shard's own, so every change a shard
sees is an ordinary change of a collection (``indexer.update``, ``indexer.compaction``).

Ownership is by id: item ``i`` lives in shard ``mix(i) % S`` (:func:`shard_of`; ``mix`` is
splitmix64's finalizer, because ids are ``record * stride + sub`` (``indexer.item_ids``) and a
plain ``i % S`` would put every caption at the same position of its image, or every whole
video, in one shard when S divides the stride). Adds take global
ids above the largest any shard ever gave and go to their owning shard; a remove goes to the
shard that holds the id; compaction runs per shard.

``query -> each shard's top (offset + k) -> merge_shard_results -> rows [offset:offset + k]``

Every item is in exactly one shard, so the best ``offset + k`` of the union is among the
shards' best ``offset + k`` each: merging them (score descending, ties by id ascending) gives
the page single-node search gives, later pages included, as long as each shard is asked for
``offset + k`` and the merged rows are sliced after. That is exact for exact search (Flat
segments, and filtered searches that go exact) and for IVF shards that share the coarse
quantizer and nprobe of the whole (``indexer.sharded_build``): a query probes the same lists
in every shard as in the whole, and scores a vector the same way. Where shards index
differently from the whole (HNSW graphs, a quantizer retrained by a shard's compaction, PQ
rescoring of each shard's own candidates) the merge is still correct for what each shard
returns, but its recall can differ from single-node's (with PQ rescoring it is at least as
good: a shard's candidates include every candidate of the whole that the shard holds).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from indexer.build_spec import CorpusKind
from indexer.collection import Collection
from indexer.errors import CollectionError, first_problem
from indexer.filters import Filter
from indexer.metadata import Item
from indexer.segments import Hit, hits_of, merge_top_k

SHARDED_JSON: Final = "sharded.json"
SHARDS: Final = "shards"

__all__ = [
    "SHARDED_JSON",
    "LocalShards",
    "ShardedInfo",
    "is_sharded",
    "merge_shard_results",
    "read_sharded",
    "shard_name",
    "shard_of",
    "shard_root",
]


class ShardedInfo(BaseModel):
    """``sharded.json``: how a collection is split, and what its shards share."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: str = "cots-sharded-collection"
    shards: int  # S: item i lives in shard shard_of(i) = mix(i) % S
    routing: Literal["splitmix64"] = "splitmix64"  # what shard_of computes
    replicas: int  # R: replicas of each shard's serving deployment
    dim: int
    model_bundle_id: str
    model_bundle_path: str | None = None
    kind: CorpusKind  # the corpus kind (image, caption, video), as in each shard's index.json
    factory: str  # the unsharded collection's factory when it was split
    created: str
    # The live version of the unsharded collection the shards were split from (its files are
    # left where they were: a snapshot to go back to, never changed again).
    source_version: int | None = None
    shared_quantizer: bool = False  # IVF: every shard holds a copy of one trained quantizer

    def write(self, folder: Path) -> None:
        """Write atomically (a reader sees the old file or the new one, never half)."""
        path = folder / SHARDED_JSON
        fresh = path.with_name(f".{SHARDED_JSON}.{os.getpid()}")
        fresh.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        os.replace(fresh, path)


def is_sharded(root: Path, name: str) -> bool:
    return (Path(root) / name / SHARDED_JSON).is_file()


def read_sharded(root: Path, name: str) -> ShardedInfo:
    path = Path(root) / name / SHARDED_JSON
    if not path.is_file():
        raise CollectionError(
            f"collection {name!r} under {root} is not sharded (no {SHARDED_JSON}); split it "
            "with `cots index shard`"
        )
    try:
        return ShardedInfo.model_validate(json.loads(path.read_bytes()))
    except ValidationError as error:
        raise CollectionError(
            f"{path} is not a readable {SHARDED_JSON}: {first_problem(error)}"
        ) from None
    except ValueError as error:
        raise CollectionError(f"{path} is not a readable {SHARDED_JSON}: {error}") from None


def shard_root(root: Path, name: str) -> Path:
    """The index root holding the shard collections of ``name``."""
    return Path(root) / name / SHARDS


def shard_name(i: int) -> str:
    return f"shard-{i}"


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    """The owning shard (int64) of each id: splitmix64's finalizer of the id, modulo
    ``shards``. Fixed forever for a collection (its items were split by it)."""
    z = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the mix wants
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(shards)).astype(np.int64)


def refuse_sharded(root: Path, name: str, what: str) -> None:
    """:class:`CollectionError` when ``name`` is sharded: ``what`` (a change or a command of
    one unsharded collection) must not read or change the snapshot it was split from."""
    if is_sharded(root, name):
        raise CollectionError(
            f"collection {name!r} is sharded ({SHARDED_JSON} in {Path(root) / name}): {what} "
            "works on unsharded collections only; `cots index add|remove|compact|sync|search|"
            f"info --collection {name}` go to its shards (indexer.sharded_update, "
            "indexer.sharded_sync, LocalShards)"
        )


def merge_shard_results(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k_i], ids [Q, k_i]) per shard -> the best ``k`` per query: score descending,
    ties by id ascending, padded with -inf / -1 (``indexer.segments.merge_top_k``, the rule
    that merges a collection's segments too)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not parts:
        raise ValueError("no shard results to merge")
    return merge_top_k(parts, parts[0][0].shape[0], k)


class LocalShards:
    """The S shard collections of a sharded collection, opened in this process; answers as
    one :class:`Collection` over all their items would."""

    def __init__(self, info: ShardedInfo, shards: list[Collection]) -> None:
        self.info = info
        self.shards = shards

    @classmethod
    def open(cls, root: Path, name: str, **open_kwargs: Any) -> LocalShards:
        """``Collection.open`` on each shard (``open_kwargs`` passed on to each)."""
        info = read_sharded(root, name)
        opened: list[Collection] = []
        try:
            for i in range(info.shards):
                opened.append(Collection.open(shard_root(root, name), shard_name(i), **open_kwargs))
        except BaseException:
            for shard in opened:
                shard.close()
            raise
        return cls(info, opened)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> LocalShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nearest(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each shard's top ``k``, merged (:func:`merge_shard_results`). For the page at
        ``offset``, ask for ``offset + k`` and slice the rows ``[offset:]``. ``rescore``: as
        ``Collection.nearest`` (each shard rescores its own candidates)."""
        parts = [
            shard.nearest(queries, k, filters=filters, rescore=rescore) for shard in self.shards
        ]
        return merge_shard_results(parts, k)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> list[list[Hit]]:
        scores, ids = self.nearest(queries, k, filters=filters, rescore=rescore)
        return self.hydrate(scores, ids, k)

    def hydrate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        """Up to ``k`` hits per row of :meth:`nearest`'s result (each id's item read from the
        shard that owns it)."""
        wanted = np.unique(ids[ids >= 0])
        found = zip(wanted.tolist(), self.get(wanted), strict=True)
        return hits_of(scores, ids, {i: item for i, item in found if item is not None}, k)

    def get(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """The live items of ``ids`` in that order, None for unknown or removed ids."""
        wanted = np.asarray(ids, dtype=np.int64)
        found: dict[int, Item | None] = {}
        owners = shard_of(wanted, len(self.shards))
        for i, shard in enumerate(self.shards):
            mine = wanted[owners == i]
            if len(mine):
                found.update(zip(mine.tolist(), shard.get(mine), strict=True))
        return [found.get(int(i)) for i in wanted]

    def stored_vectors(self, ids: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        wanted = np.asarray(ids, dtype=np.int64)
        owners = shard_of(wanted, len(self.shards))
        found: dict[int, np.ndarray] = {}
        for i, shard in enumerate(self.shards):
            mine = wanted[owners == i]
            if len(mine):
                found.update(shard.stored_vectors(mine))
        return found

    def ids_matching(self, filters: Filter | Mapping[str, Any] | None) -> np.ndarray:
        """Live ids (ascending) that match ``filters``, over every shard."""
        found = [shard.ids_matching(filters) for shard in self.shards]
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    @property
    def live(self) -> int:
        return sum(shard.info.live for shard in self.shards)
