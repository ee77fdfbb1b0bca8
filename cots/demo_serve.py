"""The demo's last steps: build the collections, try them, serve them with the page."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
from pathlib import Path
from typing import Any

import click

from indexer.home import INDEX_ROOT_VARIABLE

# collection -> (kind, corpus file)
DEMO_COLLECTIONS = {
    "images": ("image", "images.csv"),
    "captions": ("caption", "images.csv"),
    "videos": ("video", "videos.csv"),
}


def build_indices(workdir: Path, corpus: Path, bundle: Path, quiet: bool = False) -> Path:
    """[4/6] Build each demo collection, or reuse it when its live version was built from
    this corpus by this bundle (``quiet``: no progress bars)."""
    from indexer.build import build_collection
    from indexer.build_spec import BuildSpec
    from indexer.errors import CollectionError
    from indexer.index_bundle import read_info
    from indexer.versions import current_dir
    from runtime.bundle import read_manifest

    # COTS_INDEX_ROOT, which every command honours, else the demo's own folder
    # (docs/decisions.md, "One home for collections").
    root = Path(os.environ.get(INDEX_ROOT_VARIABLE, "").strip() or workdir / "indices")
    bundle_id = read_manifest(bundle).bundle_id
    for name, (kind, csv) in DEMO_COLLECTIONS.items():
        source = corpus / csv
        try:
            info = read_info(current_dir(root, name))
        except (CollectionError, OSError):
            info = None
        if (
            info is not None
            and info.model_bundle_id == bundle_id
            and info.build.get("corpus") == str(source)
        ):
            click.echo(f"[4/6] index: reusing {name} ({info.live:,} {kind} vectors)")
            continue
        click.echo(f"[4/6] index: building {name} ({kind} vectors of {source.name})")
        spec = BuildSpec(collection=name, root=root, bundle=bundle, corpus=str(source), kind=kind)
        version = build_collection(spec, bar_shown=not quiet)
        info = read_info(current_dir(root, name))
        click.echo(
            f"      {name} version {version}: {info.live:,} vectors, {info.factory}, "
            f"recall@10 vs exact {info.recall_at_10:.3f}"
        )
    return root


def example_queries(bundle: Path, root: Path, corpus: Path, samples: list) -> list[str]:
    """[5/6] A few queries through the service's own engine (batching, cache, FAISS), printed
    with their top hits; returns ready-to-paste curl commands for the served API."""
    from service.engine import QueryEngine
    from service.metrics import Metrics
    from service.settings import Settings

    texts = [samples[0].captions[0], samples[1].captions[0]]
    video_text = _first_video_caption(corpus)
    image = _first_test_image(corpus)

    async def run() -> None:
        from service.state import ServiceState

        settings = Settings(bundle=bundle, index_root=root, data_root=corpus)
        state = await ServiceState.start(settings, Metrics())
        engine: QueryEngine = state.engine
        try:
            click.echo("[5/6] example queries (the service's engine, in process)")
            for name, text in [
                ("images", texts[0]),
                ("captions", texts[1]),
                ("videos", video_text),
            ]:
                vector, _ = await engine.embed_text(text)
                page = await engine.search(name, vector, k=3)
                click.echo(f"      {name} <- {text!r}")
                for hit in page.hits:
                    span = (
                        f" [{hit.item.start_s:.1f}-{hit.item.end_s:.1f} s]"
                        if hit.item.start_s is not None
                        else ""
                    )
                    click.echo(f"        {hit.score:.3f}  {hit.item.caption}{span}")
            await _scene_queries(engine, corpus)
            pixels = engine.prepare_image(image.read_bytes())
            vector, _ = await engine.embed_image(image.read_bytes(), pixels)
            # the corpus repeats captions word for word across images: show three distinct
            page = await engine.search("captions", vector, k=12)
            click.echo(f"      captions <- image {image.name}")
            distinct = {hit.item.caption: hit.score for hit in reversed(page.hits)}
            for caption, score in sorted(distinct.items(), key=lambda kv: -kv[1])[:3]:
                click.echo(f"        {score:.3f}  {caption}")
        finally:
            await state.stop()

    asyncio.run(run())
    return [
        _curl("images", {"text": texts[0], "k": 5}),
        _curl("videos", {"text": video_text, "k": 5}),
        "curl -s -F image=@"
        + shlex.quote(str(image))
        + " http://HOST/v1/collections/captions/search/upload",
    ]


async def _scene_queries(engine: Any, corpus: Path, shown: int = 4) -> None:
    """Queries written from the test scenes (not corpus captions), searched over the whole
    images collection; a hit counts when its scene satisfies the query."""
    from training.scene_queries import corpus_scenes, satisfies, write_queries

    scenes = corpus_scenes(corpus.resolve())
    if scenes is None:
        return
    test_ids = _test_image_ids(corpus)
    queries = write_queries([scenes[i] for i in test_ids if i in scenes], n=200)
    at1 = at5 = 0
    examples: list[tuple[str, str | None, bool]] = []
    for query in queries:
        vector, _ = await engine.embed_text(query.text)
        page = await engine.search("images", vector, k=5)
        hits = [satisfies(scenes[hit.item.group_id], query) for hit in page.hits]
        at1 += bool(hits and hits[0])
        at5 += any(hits)
        if len(examples) < shown and query.kind != "object":
            examples.append((query.text, page.hits[0].item.caption, hits[0]))
    n = len(queries)
    click.echo(
        f"      images <- {n} queries written from test scenes (not corpus captions): the top "
        f"hit satisfies {100 * at1 / n:.1f} %, one of the top 5 {100 * at5 / n:.1f} %"
    )
    for text, caption, ok in examples:
        click.echo(f"        {'yes' if ok else 'NO '}  {text!r} -> {caption}")


def _test_image_ids(corpus: Path) -> list[str]:
    import csv

    with (corpus / "images.csv").open(newline="", encoding="utf-8") as handle:
        ids = [row["image_id"] for row in csv.DictReader(handle) if row.get("split") == "test"]
    return list(dict.fromkeys(ids))


def _curl(collection: str, body: dict[str, Any]) -> str:
    return (
        f"curl -s http://HOST/v1/collections/{collection}/search "
        f"-H 'content-type: application/json' -d {shlex.quote(json.dumps(body))}"
    )


def _first_video_caption(corpus: Path) -> str:
    import csv

    with (corpus / "videos.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("split") == "test":
                return row["caption"]
    return "a red circle moves to the left"


def _first_test_image(corpus: Path) -> Path:
    import csv

    with (corpus / "images.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("split") == "test":
                return corpus / row["filepath"]
    raise click.ClickException(f"{corpus / 'images.csv'} has no test image")


def serve_demo(
    bundle: Path, root: Path, corpus: Path, host: str, port: int, queries: list[str]
) -> None:
    """[6/6] The page and the API, until Ctrl-C."""
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    address = f"{host}:{port}"
    click.echo(f"[6/6] serving: open http://{address}/  (API docs: http://{address}/docs)")
    click.echo("      try:")
    for query in queries:
        click.echo("        " + query.replace("http://HOST", f"http://{address}"))
    click.echo("      Ctrl-C stops the server; running the demo again reuses every step.")
    settings = Settings(bundle=bundle, index_root=root, data_root=corpus)
    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning")
