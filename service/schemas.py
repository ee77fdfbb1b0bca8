"""Request and response bodies of the API: the wire models (``wire.schemas``, shared with the
client), and the table of error responses each route's OpenAPI entry lists.

Limits that an operator can change (k, text length, pixels) are checked against the settings
when a request arrives; the bounds in the models are the hard ceilings the schema advertises.
"""

from __future__ import annotations

from typing import Any

from wire.schemas import (
    COMPLETE_DOC,
    MIN_SCORE_DOC,
    QUERY_INPUTS,
    SORT_DOC,
    SORT_NEEDS_MIN_SCORE,
    SORT_PATTERN,
    AddItemsRequest,
    CollectionInfo,
    CollectionList,
    CompactRequest,
    EmbedImagesRequest,
    EmbedResponse,
    EmbedTextsRequest,
    ErrorDetail,
    ErrorResponse,
    Health,
    ItemId,
    JobInfo,
    NewItem,
    Readiness,
    ReindexRequest,
    RemoveItemsRequest,
    SearchHit,
    SearchRequest,
    SearchResponse,
    SegmentInfo,
)

__all__ = [
    "COMPLETE_DOC",
    "ERROR_RESPONSES",
    "MIN_SCORE_DOC",
    "QUERY_INPUTS",
    "SORT_DOC",
    "SORT_NEEDS_MIN_SCORE",
    "SORT_PATTERN",
    "AddItemsRequest",
    "CollectionInfo",
    "CollectionList",
    "CompactRequest",
    "EmbedImagesRequest",
    "EmbedResponse",
    "EmbedTextsRequest",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "ItemId",
    "JobInfo",
    "NewItem",
    "Readiness",
    "ReindexRequest",
    "RemoveItemsRequest",
    "SearchHit",
    "SearchRequest",
    "SearchResponse",
    "SegmentInfo",
]

_ERROR_MEANINGS = {
    400: "unusable input: bad base64, an image that cannot be decoded, a body that is not JSON",
    401: "an API key is needed, or the one sent is not valid",
    403: "the key lacks the scope, or the server does not do this (URL fetching, paths)",
    404: "no such collection, item, job or route",
    413: "body or image too large",
    415: "not an accepted image format",
    422: "invalid request: fields, limits, exactly one query input",
    429: "rate limited (Retry-After)",
    503: "busy (Retry-After), the collection or Redis is unavailable, or a shard of a sharded "
    "collection did not answer and complete results were asked for (Retry-After)",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": meaning}
    for status, meaning in _ERROR_MEANINGS.items()
}
