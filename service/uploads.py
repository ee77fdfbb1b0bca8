"""Items sent to be added, written as a corpus the indexer reads like any other.

Uploaded images are stored under ``<data root or index root>/.uploads/<collection>/`` named by
their SHA-256 (the same image twice is one file), and each request gets a CSV in the open_clip
layout listing its items, which ``indexer.update.add_to_collection`` embeds and adds. Paths
may only name files inside the data root: a client can never make the server read elsewhere.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
from pathlib import Path

from PIL import Image

from service.errors import (
    ForbiddenError,
    InvalidInputError,
    MalformedInputError,
    UnsupportedMediaError,
)
from service.queries import decode_base64_image
from service.schemas import NewItem
from service.settings import Settings

_SUFFIX = {
    "JPEG": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "GIF": ".gif",
    "BMP": ".bmp",
    "TIFF": ".tif",
}


def resolve_data_path(relative: str, settings: Settings) -> Path:
    """``relative`` inside the data root, or 400/403 saying why not."""
    if settings.data_root is None:
        raise ForbiddenError(
            "this server reads no files named by clients (COTS_DATA_ROOT is not set)"
        )
    root = settings.data_root.resolve()
    shown = relative[:200]
    try:
        candidate = (root / relative).resolve()
        inside = candidate.is_relative_to(root)
        exists = inside and candidate.exists()
    except (OSError, ValueError):  # a NUL byte, a name too long for the file system
        raise MalformedInputError(f"path {shown!r} is not a usable file name") from None
    if not inside:
        raise ForbiddenError(f"path {shown!r} is outside the data root")
    if not exists:
        raise MalformedInputError(f"path {shown!r} does not exist under the data root")
    return candidate


def upload_folder(settings: Settings, collection: str) -> Path:
    base = settings.data_root if settings.data_root is not None else settings.index_root
    folder = Path(base) / ".uploads" / collection
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _store_image(data: bytes, folder: Path) -> Path:
    try:
        with Image.open(io.BytesIO(data)) as image:
            suffix = _SUFFIX.get(image.format or "")
    except Exception:
        suffix = None
    if suffix is None:
        raise UnsupportedMediaError(f"an item's image is not one of {', '.join(_SUFFIX)}")
    path = folder / f"{hashlib.sha256(data).hexdigest()}{suffix}"
    if not path.exists():
        temporary = path.with_suffix(path.suffix + ".part")
        temporary.write_bytes(data)
        temporary.replace(path)
    return path


def write_items_corpus(items: list[NewItem], collection: str, settings: Settings) -> Path:
    """A CSV corpus (filepath, caption) of ``items``; their images stored first."""
    folder = upload_folder(settings, collection)
    rows = []
    for number, item in enumerate(items):
        if item.image is not None:
            data = decode_base64_image(item.image, settings.limits.max_body_bytes)
            path = _store_image(data, folder)
        else:
            assert item.path is not None  # the schema requires one of the two
            path = resolve_data_path(item.path, settings)
        caption = item.caption if item.caption is not None else path.stem
        if not caption.strip():
            raise InvalidInputError(f"item {number}: caption is empty")
        rows.append((str(path), caption))
    corpus = folder / f"add-{uuid.uuid4().hex}.csv"
    with corpus.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "caption"])
        writer.writerows(rows)
    return corpus
