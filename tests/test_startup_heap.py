"""The server freezes its start-up heap (out of the cyclic collector's reach) while it serves,
and releases it when it stops."""

from __future__ import annotations

import gc
from pathlib import Path

from indexer.collection import Collection
from runtime.encoder import Encoder
from service.settings import Settings
from tests.live_server import live_server


def expected_ids(bundle: Path, root: Path, text: str, k: int = 10) -> list[int]:
    encoder = Encoder(bundle)
    with Collection.open(root, "images", bundle_id=encoder.bundle_id) as collection:
        (hits,) = collection.search(encoder.encode_texts([text]), k)
    return [hit.id for hit in hits]


def test_start_up_heap_is_frozen_while_serving_and_released_after(
    micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    gc.unfreeze()
    settings = Settings(bundle=micro_bundle, index_root=served_root[1], rate_limit_per_minute=0)
    with live_server(settings) as server:
        frozen = gc.get_freeze_count()
        # The sessions and collections are built by now, so they are among the frozen.
        assert frozen > 10_000
        with server.client() as client:
            response = client.post("/v1/collections/images/search", json={"text": "a red circle"})
        assert response.status_code == 200, response.text
        # The hits are what the same search gives in process: serving a frozen heap changes
        # nothing of the answer.
        assert [hit["id"] for hit in response.json()["hits"]] == expected_ids(
            micro_bundle, served_root[1], "a red circle"
        )
        # What requests create is not frozen (a full pass still reaches it); reference
        # counting still frees frozen objects, so the count may only fall.
        assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0
