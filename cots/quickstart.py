"""``cots quickstart FOLDER``: a user's own photos and videos, from a folder to a search page.

    FOLDER ──scan──► media files ──(bundle)──► sync "photos" (images) ──► serve ──► URL
                                   │           sync "photos-videos" (videos, when there are any)
      --model NAME --pretrained FILE: export once into cots-data/bundles/<name>-<weights hash>
      --bundle DIR: use it;  neither: the bundle the collection was built with before

Every step is the command a user could run by hand (``cots export``, ``cots index sync``,
``cots serve``) with the defaults they share (``indexer.home``), so a second run costs what
changed in the folder since the first: the export is reused, the sync stats the files and
encodes only new or changed ones, and the server starts on what is there.
"""

from __future__ import annotations

from pathlib import Path

import click

from indexer.home import bundles_folder, default_index_root
from indexer.media_scan import MediaKind, MediaScanError, scan_media

VIDEO_SUFFIX = "-videos"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model", "model_name", help="open_clip model name, e.g. ViT-B-32 (with --pretrained)."
)
@click.option(
    "--pretrained",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Local weights file for --model (loaded with weights_only=True).",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="A model bundle (cots export) instead of --model/--pretrained.",
)
@click.option("--collection", default="photos", show_default=True, help="Collection of the images.")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Collections folder [COTS_INDEX_ROOT; default cots-data/collections].",
)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--no-serve", is_flag=True, help="Stop after the sync; print the serve command.")
@click.pass_context
def quickstart(
    ctx: click.Context,
    folder: Path,
    model_name: str | None,
    pretrained: Path | None,
    bundle: Path | None,
    collection: str,
    root: Path | None,
    workers: int,
    host: str,
    port: int,
    no_serve: bool,
) -> None:
    """Index FOLDER (recursively; no captions needed) and serve its search page.

    Exports the model bundle the first time (--model with --pretrained), syncs collection
    `photos` with the folder's images and, when it has videos, `photos-videos` with them,
    then serves at http://HOST:PORT/. Run it again after adding or deleting photos: only
    what changed is embedded. Keep the folder in sync later with `cots index sync`.
    """
    root = root or default_index_root()
    try:
        scan = scan_media(folder)
    except MediaScanError as error:
        raise click.ClickException(str(error)) from None
    if not scan.files:
        raise click.ClickException(f"no photos or videos to index: {scan.summary()}")
    click.echo(scan.summary())
    bundle = _bundle(root, collection, bundle, model_name, pretrained)
    names = []
    kinds: tuple[tuple[MediaKind, str], ...] = (
        ("image", collection),
        ("video", collection + VIDEO_SUFFIX),
    )
    for kind, name in kinds:
        if scan.of_kind(kind):
            _sync(root, name, folder, kind, bundle, workers)
            names.append(name)
    serve_line = (
        f"cots serve --index-root {root} --bundle {bundle} "
        + " ".join(f"--collection {name}" for name in names)
        + f" --host {host} --port {port}"
    )
    if no_serve:
        click.echo(f"ready; serve with: {serve_line}")
        return
    click.echo(f"search page: http://{host}:{port}/?c={names[0]}", color=False)
    from service.cli import serve

    ctx.invoke(
        serve,
        bundle=bundle,
        index_root=root,
        collections=tuple(names),
        host=host,
        port=port,
    )


def _bundle(
    root: Path,
    collection: str,
    bundle: Path | None,
    model_name: str | None,
    pretrained: Path | None,
) -> Path:
    """The bundle to embed with: given, exported before from the same weights, exported
    now, or the one the collection was built with."""
    if bundle is not None:
        if model_name or pretrained:
            raise click.UsageError("give --bundle, or --model with --pretrained, not both")
        return bundle
    if model_name is None and pretrained is None:
        from indexer.errors import IndexerError
        from indexer.home import bundle_of_collections

        try:
            return bundle_of_collections(root, [collection])
        except (IndexerError, OSError):
            raise click.UsageError(
                "name the model: --model NAME --pretrained WEIGHTS (an open_clip model and its "
                "weights file), or --bundle DIR"
            ) from None
    if model_name is None or pretrained is None:
        raise click.UsageError("--model and --pretrained go together")
    from runtime.bundle import file_sha256

    out = bundles_folder(root) / f"{model_name}-{file_sha256(pretrained)[:12]}"
    if (out / "bundle.json").is_file():
        click.echo(f"model bundle: {out} (exported before from {pretrained})")
        return out
    click.echo(f"exporting {model_name} with {pretrained} to {out} (once)")
    from model.errors import ModelError
    from training.export import ExportOptions, export_pretrained

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_pretrained(model_name, str(pretrained), out, ExportOptions())
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    return out


def _sync(root: Path, name: str, folder: Path, kind: MediaKind, bundle: Path, workers: int) -> None:
    from indexer.errors import IndexerError
    from indexer.sync import sync_collection

    try:
        report = sync_collection(
            root=root, collection=name, folder=folder, kind=kind, bundle=bundle, workers=workers
        )
    except IndexerError as error:
        raise click.ClickException(str(error)) from None
    click.echo(report.summary())
