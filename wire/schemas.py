"""Request and response bodies of the API (pydantic, so the OpenAPI document is exact): the
service validates and answers with them, the client (``cots.client``) parses into them.

Limits that an operator can change (k, text length, pixels) are checked against the settings
when a request arrives; the bounds here are the hard ceilings the schema advertises.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from wire.filters import MAX_CONDITIONS, MAX_LIST, Filter

ItemId = Annotated[int, Field(ge=0, lt=2**63)]

_FILTERS_DOC = (
    "keep only the items that match, on kind, group_id, uri or a metadata key: "
    '{"split": "test"} (equals), {"year": {"gte": 2020, "lt": 2024}} (numbers or ISO dates), '
    '{"tag": {"in": ["a", "b"]}}, {"split": {"ne": "train"}}, {"caption": {"exists": true}}, '
    '{"any_of": [{...}, {...}]} (OR); conditions AND together. At most '
    f"{MAX_CONDITIONS} conditions, {MAX_LIST} values in one list (docs/service.md)"
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


SORT_PATTERN = r"^-?[A-Za-z0-9_]{1,64}$"
QUERY_INPUTS = ("text", "image", "image_url", "embedding", "similar_to")
MIN_SCORE_DOC = (
    "leave out hits scoring below this (cosine similarity, -1 to 1); the results end there: "
    "next_offset is null on the page that reaches it"
)
SORT_DOC = (
    "order by a metadata field instead of score: 'taken' ascending, '-taken' descending. "
    "Needs min_score (a 422 without it): every hit at or above min_score (up to the server's "
    "max_offset + max_k best) is sorted, then paged with offset and k; hits without the field "
    "come last; ties by score, then id"
)

COMPLETE_DOC = (
    "a sharded collection with a shard that does not answer: 503 with Retry-After instead of "
    "a partial page (partial: true) of the other shards' hits"
)

SORT_NEEDS_MIN_SCORE = (
    "sort needs min_score: the hits at or above it are what gets sorted (e.g. min_score 0.2)"
)


class SearchRequest(_Body):
    """One query (exactly one of text, image, image_url, embedding, similar_to) against one
    collection."""

    text: str | None = Field(None, min_length=1, max_length=100_000, description="query text")
    image: str | None = Field(
        None, min_length=1, description="query image, base64 (a data: URL prefix is allowed)"
    )
    image_url: str | None = Field(
        None, min_length=1, max_length=2048, description="image URL (only allow-listed hosts)"
    )
    embedding: list[float] | None = Field(
        None, min_length=1, max_length=8192, description="a query vector in the model's space"
    )
    similar_to: ItemId | None = Field(
        None,
        description="an item id of this collection: search with its stored vector (no "
        "re-encode); the item itself is left out of the hits",
    )
    # Capped by the server's limits (COTS_LIMITS__MAX_K, __MAX_OFFSET), checked once per
    # request with a message naming the limit; a second, fixed cap here would disagree.
    k: int = Field(10, ge=1, description="results per page (at most the server's max_k)")
    offset: int = Field(0, ge=0, description="results to skip (at most the server's max_offset)")
    filters: Filter | None = Field(None, description=_FILTERS_DOC)
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description=MIN_SCORE_DOC)
    sort: str | None = Field(None, pattern=SORT_PATTERN, description=SORT_DOC)
    complete: bool = Field(False, description=COMPLETE_DOC)

    @model_validator(mode="after")
    def _one_query(self) -> Self:
        # similar_to is an id, and 0 is one: "given" means "not None" for it.
        given = [
            name
            for name in QUERY_INPUTS
            if (self.similar_to is not None if name == "similar_to" else getattr(self, name))
        ]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(QUERY_INPUTS)}"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.sort is not None and self.min_score is None:
            raise ValueError(SORT_NEEDS_MIN_SCORE)
        return self


class SearchHit(BaseModel):
    id: int
    score: float = Field(description="cosine similarity to the query")
    kind: Literal["image", "caption", "video", "segment"]
    uri: str
    caption: str | None
    group_id: str = Field(description="the image or video the item belongs to")
    metadata: dict[str, Any]
    start_s: float | None = Field(None, description="a video moment's start (seconds)")
    end_s: float | None = Field(None, description="a video moment's end (seconds)")
    media_url: str = Field(description="where this server serves the item's file")


class SearchResponse(BaseModel):
    collection: str
    version: int
    query: Literal["text", "image", "embedding", "similar_to"]
    k: int
    offset: int
    cached: bool = Field(description="the query's embedding came from the cache")
    took_ms: float
    next_offset: int | None = Field(description="offset of the next page; null on the last")
    hits: list[SearchHit]
    partial: bool = Field(
        False,
        description="a sharded collection answered without some of its shards (their items "
        "are missing from the hits; header X-COTS-Partial names them too); absent for "
        "collections that are not sharded",
    )
    missing_shards: list[int] = Field(
        default_factory=list, description="the shards that did not answer (partial: true)"
    )


class EmbedTextsRequest(_Body):
    texts: list[str] = Field(min_length=1, max_length=1024)


class EmbedImagesRequest(_Body):
    images: list[str] = Field(min_length=1, max_length=1024, description="base64 images")


class EmbedResponse(BaseModel):
    model_bundle_id: str
    dim: int
    embeddings: list[list[float]]


class SegmentInfo(BaseModel):
    id: str
    count: int = Field(description="vectors in the segment, removed ones included")
    tombstones: int = Field(description="of them, removed (dropped at the next compaction)")
    index_type: str = Field(description="FAISS factory string")


class CollectionInfo(BaseModel):
    name: str
    kind: Literal["image", "caption", "video"]
    modality: Literal["image", "text", "video"]
    version: int
    count: int = Field(description="vectors in the index")
    live: int = Field(description="items not removed")
    dim: int
    index_type: str = Field(description="FAISS factory string")
    model_bundle_id: str
    recall_at_10: float = Field(description="measured against exact search at build time")
    created: str
    versions: list[int] = Field(description="versions on disk")
    segments: list[SegmentInfo] = Field(description="the immutable segments of this version")
    tombstones: int = Field(description="removed items whose vectors await compaction")
    size_bytes: int = Field(description="bytes on disk of this version and its segments")


class CollectionList(BaseModel):
    collections: list[CollectionInfo]
    unavailable: dict[str, str] = Field(description="collections not served, and why")


class NewItem(_Body):
    """An item to add: an uploaded image (base64) or a file under the server's data root."""

    image: str | None = Field(None, min_length=1, description="image, base64")
    path: str | None = Field(
        None, min_length=1, max_length=1024, description="file path relative to the data root"
    )
    caption: str | None = Field(None, max_length=10_000)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.image is None) == (self.path is None):
            raise ValueError("give exactly one of image, path")
        return self


class AddItemsRequest(_Body):
    items: list[NewItem] = Field(min_length=1, max_length=1000)


class RemoveItemsRequest(_Body):
    ids: list[ItemId] = Field(default_factory=list, max_length=100_000)
    filters: Filter | None = Field(None, description=_FILTERS_DOC)

    @model_validator(mode="after")
    def _something(self) -> Self:
        if not self.ids and not self.filters:
            raise ValueError("name the items to remove: ids, filters, or both")
        return self


class ReindexRequest(_Body):
    corpus: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="corpus relative to the data root (default: the collection's own)",
    )
    factory: str | None = Field(
        None, min_length=1, max_length=200, description="FAISS factory string, or auto"
    )
    split: str | None = Field(None, min_length=1, max_length=100)


class CompactRequest(_Body):
    """When to merge segments (`docs/index.md`, "Compaction"); the defaults are the policy's."""

    full: bool = Field(False, description="merge every segment into one")
    tombstone_ratio: float = Field(
        0.2, gt=0, le=1, description="rewrite a segment once this share of it is removed"
    )
    max_segments: int = Field(
        10, ge=1, le=10_000, description="beyond this many segments, merge the newest small ones"
    )
    small_ratio: float = Field(
        0.1, gt=0, le=1, description="'small': fewer items than this share of the largest"
    )


class JobInfo(BaseModel):
    id: str
    status: str
    kind: Literal["add", "remove", "reindex", "compact", "duplicates", "sync"] | None = None
    collection: str | None = None
    progress: dict[str, Any] = Field(default_factory=dict)
    result: Any = None
    error: str | None = None


class ErrorDetail(BaseModel):
    status: int
    code: str = Field(description="a word for the status, e.g. not_found, rate_limited")
    message: str = Field(description="what is wrong, with the value and what is allowed")
    details: list[dict[str, Any]] | None = Field(None, description="per-field problems (422)")


class ErrorResponse(BaseModel):
    """Every error the API answers (4xx and 5xx)."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    replica: str = Field(description="host name of the replica that answered")


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "unready"]
    process: int = Field(
        description="process id of the worker that answered (cots serve --workers)"
    )
    model_bundle_id: str
    redis: Literal["ok", "down", "disabled"]
    collections: dict[str, int] = Field(description="served collections and their versions")
    unavailable: dict[str, str]
