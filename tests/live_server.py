"""A real server for the service tests: uvicorn on a free port in a thread, and the three
kinds of collection (images, captions, videos) built with the micro bundle."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from indexer.build import build_collection
from service.app import create_app
from service.settings import Settings
from tests.micro import build_spec
from tests.tools import free_port

COLLECTION_KINDS = {"images": "image", "captions": "caption", "videos": "video"}


def build_served_root(folder: Path, bundle: Path) -> tuple[Path, Path]:
    """(corpus, index root) with collections images, captions and videos of a small corpus."""
    from model.data.synth import SynthConfig, generate_corpus

    corpus = folder / "corpus"
    config = SynthConfig(
        seed=21, n_images=48, n_videos=4, image_size=32, video_size=32, video_frames=24
    )
    generate_corpus(corpus, config, workers=1)
    root = folder / "indices"
    for name, kind in COLLECTION_KINDS.items():
        csv = corpus / ("videos.csv" if kind == "video" else "images.csv")
        build_collection(build_spec(root, bundle, csv, collection=name, kind=kind), progress=None)
    return corpus, root


class LiveServer:
    """``create_app(settings)`` behind uvicorn on 127.0.0.1; ``url`` once started."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):  # type: ignore[no-untyped-def]
        return self.app.state.service

    def client(self, **options: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **options)  # type: ignore[arg-type]

    def search(self, collection: str, **body: Any) -> dict[str, Any]:
        """The JSON answer of one search sent by hand, to compare a client's with."""
        with self.client() as client:
            response = client.post(f"/v1/collections/{collection}/search", json=body)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


@contextmanager
def live_server(settings: Settings) -> Iterator[LiveServer]:
    server = LiveServer(settings).start()
    try:
        yield server
    finally:
        server.stop()
