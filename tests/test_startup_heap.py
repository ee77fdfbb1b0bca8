"""The server freezes its start-up heap (out of the cyclic collector's reach) while it serves,
and releases it when it stops."""

from __future__ import annotations

import gc
from pathlib import Path

from service.settings import Settings
from tests.live_server import live_server


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
            assert client.post("/v1/collections/images/search", json={"text": "a red circle"})
        # What requests create is not frozen (a full pass still reaches it); reference
        # counting still frees frozen objects, so the count may only fall.
        assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0
