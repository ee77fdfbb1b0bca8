"""The API's operations as data: each builder returns a ``Call`` (method, path, body, the
response model), which the sync and async clients send the same way.

Requests are not validated here: the server is the authority on its limits (an operator
may lower ``k`` or the text length), and its 422 names the field. Responses are parsed
into the API's pydantic models (``wire.schemas``, which the service answers with), so a
client and the server it talks to agree on every field.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel

from wire.filters import Filter
from wire.schemas import (
    CollectionInfo,
    CollectionList,
    EmbedResponse,
    JobInfo,
    NewItem,
    Readiness,
    SearchHit,
    SearchResponse,
)

Model = TypeVar("Model", bound=BaseModel)
# An image: its bytes, or the path of a file holding it (a str is a path, never base64).
ImageInput = bytes | str | os.PathLike[str]
Filters = Filter | Mapping[str, Any]
# Form fields and files, as httpx takes them: (field, (file name, bytes, content type)).
Upload = tuple[str, tuple[str, bytes, str]]
# RQ's statuses that end a job; "finished" is the only good one.
JOB_DONE = frozenset({"finished", "failed", "stopped", "canceled"})


@dataclass(frozen=True)
class Call(Generic[Model]):
    method: str
    path: str
    model: type[Model]
    json: Any = None
    data: dict[str, str] | None = None
    files: list[Upload] = field(default_factory=list)
    # A readiness probe's 503 carries its body, which is the answer rather than an error.
    ok_statuses: frozenset[int] = frozenset()


def image_bytes(image: ImageInput) -> tuple[str, bytes]:
    """(file name, bytes) of an image given as bytes or as a path."""
    if isinstance(image, bytes | bytearray | memoryview):
        return "image", bytes(image)
    path = Path(image)
    return path.name, path.read_bytes()


def filters_json(filters: Filters | None) -> Any:
    if filters is None:
        return None
    if isinstance(filters, Filter):
        return filters.model_dump(mode="json", by_alias=True, exclude_none=True)
    return dict(filters)


def _collection(name: str) -> str:
    return f"/v1/collections/{quote(name, safe='')}"


def search(
    collection: str,
    text: str | None = None,
    *,
    image: ImageInput | None = None,
    image_url: str | None = None,
    embedding: Sequence[float] | None = None,
    similar_to: int | None = None,
    k: int = 10,
    offset: int = 0,
    filters: Filters | None = None,
    min_score: float | None = None,
    sort: str | None = None,
    complete: bool = False,
) -> Call[SearchResponse]:
    """One page of hits for exactly one of text, image, image_url, embedding or similar_to
    (an item id). An image goes as a multipart upload (no base64 inflation); the others as
    JSON. ``min_score`` and ``sort`` (a metadata field, ``-field`` descending) go as given;
    ``complete`` (sent only when set): a sharded collection missing a shard answers 503
    instead of a partial page."""
    given = [
        name
        for name, value in (
            ("text", text),
            ("image", image),
            ("image_url", image_url),
            ("embedding", embedding),
            ("similar_to", similar_to),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one of text, image, image_url, embedding, similar_to"
            + (f" (got {', '.join(given)})" if given else "")
        )
    path = f"{_collection(collection)}/search"
    # Only what was given: a server without these fields refuses unknown ones.
    relevance = {
        name: value
        for name, value in (("min_score", min_score), ("sort", sort), ("complete", complete))
        if value is not None and value is not False
    }
    if image is not None:
        name, data = image_bytes(image)
        form = {"k": str(k), "offset": str(offset)}
        form.update((field, str(value)) for field, value in relevance.items())
        if filters is not None:
            form["filters"] = json.dumps(filters_json(filters), separators=(",", ":"))
        return Call(
            "POST",
            f"{path}/upload",
            SearchResponse,
            data=form,
            files=[("image", (name, data, "application/octet-stream"))],
        )
    body: dict[str, Any] = {"k": k, "offset": offset, **relevance}
    if text is not None:
        body["text"] = text
    elif image_url is not None:
        body["image_url"] = image_url
    elif similar_to is not None:
        body["similar_to"] = int(similar_to)
    else:
        body["embedding"] = [float(value) for value in embedding or ()]
    if filters is not None:
        body["filters"] = filters_json(filters)
    return Call("POST", path, SearchResponse, json=body)


def embed_texts(texts: Sequence[str]) -> Call[EmbedResponse]:
    return Call("POST", "/v1/embed/texts", EmbedResponse, json={"texts": list(texts)})


def embed_images(images: Sequence[ImageInput]) -> Call[EmbedResponse]:
    files = []
    for image in images:
        name, data = image_bytes(image)
        files.append(("images", (name, data, "application/octet-stream")))
    return Call("POST", "/v1/embed/images/upload", EmbedResponse, files=files)


def list_collections() -> Call[CollectionList]:
    return Call("GET", "/v1/collections", CollectionList)


def get_collection(name: str) -> Call[CollectionInfo]:
    return Call("GET", _collection(name), CollectionInfo)


def get_item(collection: str, item_id: int) -> Call[SearchHit]:
    return Call("GET", f"{_collection(collection)}/items/{int(item_id)}", SearchHit)


def new_image_item(image: ImageInput, caption: str | None = None) -> NewItem:
    """An item to add from an image's bytes or file (sent base64, as the API takes it)."""
    _, data = image_bytes(image)
    return NewItem(image=base64.b64encode(data).decode("ascii"), caption=caption)


def add_items(collection: str, items: Sequence[NewItem | Mapping[str, Any]]) -> Call[JobInfo]:
    body = [
        item.model_dump(exclude_none=True) if isinstance(item, NewItem) else dict(item)
        for item in items
    ]
    return Call("POST", f"{_collection(collection)}/items", JobInfo, json={"items": body})


def add_images(
    collection: str, images: Sequence[ImageInput], captions: Sequence[str | None] | None = None
) -> Call[JobInfo]:
    """Add images from bytes or local files (uploaded base64); ``captions`` pairs with them."""
    paired = captions if captions is not None else [None] * len(images)
    if len(paired) != len(images):
        raise ValueError(f"{len(images)} images but {len(paired)} captions")
    items = [new_image_item(image, caption) for image, caption in zip(images, paired, strict=True)]
    return add_items(collection, items)


def remove_items(
    collection: str, ids: Sequence[int] = (), filters: Filters | None = None
) -> Call[JobInfo]:
    body: dict[str, Any] = {"ids": [int(item) for item in ids]}
    if filters is not None:
        body["filters"] = filters_json(filters)
    return Call("POST", f"{_collection(collection)}/items/remove", JobInfo, json=body)


def reindex(
    collection: str,
    corpus: str | None = None,
    factory: str | None = None,
    split: str | None = None,
) -> Call[JobInfo]:
    given = {"corpus": corpus, "factory": factory, "split": split}
    body = {name: value for name, value in given.items() if value is not None}
    return Call("POST", f"{_collection(collection)}/reindex", JobInfo, json=body)


def compact(collection: str, full: bool = False, **policy: float | int) -> Call[JobInfo]:
    body = {"full": full, **policy}
    return Call("POST", f"{_collection(collection)}/compact", JobInfo, json=body)


def get_job(job_id: str) -> Call[JobInfo]:
    return Call("GET", f"/v1/jobs/{quote(job_id, safe='')}", JobInfo)


def readiness() -> Call[Readiness]:
    return Call("GET", "/readyz", Readiness, ok_statuses=frozenset({503}))
