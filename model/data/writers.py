"""Write image corpora in the formats users bring: CSV, folder, WebDataset, Karpathy JSON.

Used to convert corpora and to test the readers by round trip. Images are re-encoded as PNG
(lossless) by default, so pixels read back exactly; file names are made from a running index
and the sanitised group id, so they are stable and never collide.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from model.data.records import ImageSample

# Encoder options per format. PNG keeps every pixel and mode; WebP keeps the pixels of RGB and
# RGBA images (others become RGB); JPEG is lossy.
IMAGE_FORMATS: dict[str, dict[str, Any]] = {
    "png": {"format": "PNG"},
    "webp": {"format": "WEBP", "lossless": True, "quality": 100},
    "jpg": {"format": "JPEG", "quality": 95},
}
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_PATH_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")
_WORD = re.compile(r"[^\W_]+")


def write_csv(
    samples: Iterable[ImageSample], out_dir: str | Path, *, image_format: str = "png"
) -> Path:
    """Write ``out_dir/images/*`` and ``out_dir/images.csv`` (one row per caption); return the CSV.

    The header is ``filepath,caption,image_id,split``; paths are relative to the CSV. Formats:
    png (default: pixels read back exactly), webp (lossless, exact for RGB and RGBA), jpg
    (lossy: smaller, but pixels will not read back exactly).
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format {image_format!r} is not one of {sorted(IMAGE_FORMATS)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "images.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["filepath", "caption", "image_id", "split"])
        for index, sample in enumerate(samples):
            relative = f"images/{_stem(index, sample.group_id)}.{image_format}"
            (out_dir / relative).write_bytes(encode_image(sample.image, image_format))
            split = sample.record.split or ""
            for caption in sample.captions:
                writer.writerow([relative, caption, sample.group_id, split])
    return csv_path


def write_folder(samples: Iterable[ImageSample], out_dir: str | Path) -> Path:
    """Write ``<name>.png`` + ``<name>.txt`` (one caption per line) per sample; return ``out_dir``.

    ``<name>`` is the group id itself when it is a safe relative path (``a-1``, ``coco/17``) and
    not taken yet, so the folder reader gives the group ids back; otherwise a sanitised name
    with the running index. A folder carries no splits.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for index, sample in enumerate(samples):
        name = _folder_name(index, sample.group_id, taken)
        image_path = out_dir / f"{name}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        image_path.write_bytes(encode_image(sample.image, "png"))
        image_path.with_suffix(".txt").write_text(_caption_lines(sample.captions), encoding="utf-8")
    return out_dir


def write_webdataset(
    samples: Iterable[ImageSample], out_dir: str | Path, *, shard_size: int = 1000
) -> list[Path]:
    """Write ``shard-000000.tar``, ... of ``shard_size`` samples each; return the shard paths.

    Each sample is ``{key}.json`` (``image_id``, ``split``), ``{key}.png`` and ``{key}.txt``.
    The bytes are deterministic: members in key order, mtime 0, uid/gid 0, no user names.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    numbered = enumerate(samples)
    # Lazily, one shard at a time: samples hold decoded images and a shard may be large.
    while (first := next(numbered, None)) is not None:
        shards.append(out_dir / f"shard-{len(shards):06d}.tar")
        with tarfile.open(shards[-1], "w", format=tarfile.PAX_FORMAT) as tar:
            rest = itertools.islice(numbered, shard_size - 1)
            for index, sample in itertools.chain([first], rest):
                _add_sample(tar, _stem(index, sample.group_id), sample)
    return shards


def write_karpathy(
    samples: Iterable[ImageSample], out_dir: str | Path, *, dataset_name: str = "synthetic"
) -> Path:
    """Write ``out_dir/images/*.png`` and a Karpathy-split ``out_dir/dataset.json``; return it.

    ``imgid`` is the running index; a group id that is a plain integer is stored as ``cocoid``,
    any other as ``image_id``, which the Karpathy reader reads first. A sample without a split
    is written as ``"train"``.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images = list(_karpathy_entries(samples, out_dir))
    json_path = out_dir / "dataset.json"
    with json_path.open("w", encoding="utf-8") as file:
        json.dump({"dataset": dataset_name, "images": images}, file, ensure_ascii=False)
    return json_path


def _karpathy_entries(samples: Iterable[ImageSample], out_dir: Path) -> Iterator[dict[str, Any]]:
    sentence_id = 0
    for index, sample in enumerate(samples):
        filename = f"{_stem(index, sample.group_id)}.png"
        (out_dir / "images" / filename).write_bytes(encode_image(sample.image, "png"))
        sentences = []
        for caption in sample.captions:
            tokens = _WORD.findall(caption.lower())
            sentences.append(
                {"tokens": tokens, "raw": caption, "imgid": index, "sentid": sentence_id}
            )
            sentence_id += 1
        entry: dict[str, Any] = {
            "filepath": "images",
            "filename": filename,
            "imgid": index,
            "split": sample.record.split or "train",
            "sentids": [sentence["sentid"] for sentence in sentences],
            "sentences": sentences,
        }
        if _CANONICAL_INT.fullmatch(sample.group_id):
            entry["cocoid"] = int(sample.group_id)
        else:
            entry["image_id"] = sample.group_id
        yield entry


def encode_image(image: Image.Image, image_format: str = "png") -> bytes:
    """Encode ``image``; PNG keeps its mode when PNG can store it (RGB, RGBA, L, P, I, ...)."""
    options = dict(IMAGE_FORMATS[image_format])
    if image_format == "png" and image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    elif image_format == "jpg" and image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


def _stem(index: int, group_id: str) -> str:
    # No dots: a WebDataset key ends at the first dot of the member name.
    return f"{index:06d}_{_UNSAFE.sub('_', group_id).strip('_')[:40]}".rstrip("_")


def _folder_name(index: int, group_id: str, taken: set[str]) -> str:
    parts = group_id.split("/")
    safe = all(_PATH_PART.fullmatch(part) and not part.endswith(".") for part in parts)
    # Compared case-folded: on macOS and Windows "A.png" and "a.png" are one file.
    name = group_id if safe and group_id.casefold() not in taken else _stem(index, group_id)
    while name.casefold() in taken:
        name += "_"
    taken.add(name.casefold())
    return name


def _caption_lines(captions: Iterable[str]) -> str:
    # One caption per line: a line break inside a caption would split it in two.
    return "".join(" ".join(caption.splitlines()) + "\n" for caption in captions)


def _add_sample(tar: tarfile.TarFile, key: str, sample: ImageSample) -> None:
    meta = {"image_id": sample.group_id, "split": sample.record.split}
    # Extensions in sorted order, so the member order is fixed too.
    _add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode())
    _add_member(tar, f"{key}.png", encode_image(sample.image, "png"))
    _add_member(tar, f"{key}.txt", _caption_lines(sample.captions).encode())


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
