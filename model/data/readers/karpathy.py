"""The Karpathy-split JSON used for Flickr30K and COCO retrieval benchmarks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model.data.readers.base import ImageReader
from model.data.records import CorpusError, ImageRecord, SkipReport

# Karpathy's COCO split puts 30K validation images in "restval" and trains on them.
_SPLIT_ALIASES = {"train": frozenset({"train", "restval"})}


class KarpathyImageReader(ImageReader):
    """Images and sentences from ``dataset_{coco,flickr30k}.json``.

    The image path is ``images_root / filepath / filename`` (``filepath`` is present for COCO,
    e.g. ``val2014``); ``images_root`` defaults to the JSON's directory. The group id is
    ``image_id`` (written by :func:`model.data.writers.write_karpathy` for non-numeric ids), else
    ``cocoid``, else ``imgid``, else the file name. Captions are the sentences' ``raw`` text,
    kept as annotated (duplicates too, as the benchmark protocol counts them). ``split="train"``
    also selects ``"restval"`` images, as the standard COCO Karpathy training set does; the
    record keeps the split as written. With ``captions_required=False`` an image without
    sentences is an item with no captions rather than a skip.
    """

    def __init__(
        self,
        json_path: str | Path,
        *,
        images_root: str | Path | None = None,
        split: str | None = None,
        captions_required: bool = True,
    ) -> None:
        super().__init__(json_path)
        self.captions_required = captions_required
        self.json_path = Path(json_path)
        self.images_root = Path(images_root) if images_root is not None else self.json_path.parent
        self.split = split
        self.images = _load_images(self.json_path)

    def records(self) -> Iterator[ImageRecord]:
        report = self._start_pass()
        wanted = _SPLIT_ALIASES.get(self.split, {self.split}) if self.split is not None else None
        for index, entry in enumerate(self.images):
            where = f"images[{index}] of {self.json_path}"
            if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
                report.skip(where, "bad entry", "expected an object with a 'filename' string")
                continue
            split = entry.get("split")
            split = str(split) if split is not None else None
            if wanted is not None and split not in wanted:
                continue
            path = self.images_root / str(entry.get("filepath") or "") / entry["filename"]
            captions = _captions(entry, str(path), report if self.captions_required else None)
            if not captions and self.captions_required:
                continue
            if not path.is_file():
                report.skip(str(path), "missing file", f"listed in {where}")
                continue
            yield ImageRecord(
                uri=str(path),
                captions=captions,
                group_id=_group_id(entry),
                split=split,
                path=path,
            )


def _load_images(json_path: Path) -> list[Any]:
    try:
        with json_path.open(encoding="utf-8") as file:
            data = json.load(file)
    except FileNotFoundError as error:
        raise CorpusError(f"Karpathy JSON {json_path} does not exist") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorpusError(f"cannot read Karpathy JSON {json_path}: {error}") from error
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CorpusError(
            f"{json_path} is not a Karpathy-split JSON: expected an object with an 'images' "
            f"list, got {type(data).__name__}"
            + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
        )
    return images


def _captions(entry: dict[str, Any], where: str, report: SkipReport | None) -> tuple[str, ...]:
    """The entry's caption texts; empty ones are reported to ``report`` (None: not counted)."""
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        if report is not None:
            report.skip(where, "empty caption", "no 'sentences' list")
        return ()
    captions = []
    for number, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        caption = raw.strip() if isinstance(raw, str) else ""
        if caption:
            captions.append(caption)
        elif report is not None:
            report.skip(where, "empty caption", f"sentence {number}")
    return tuple(captions)


def _group_id(entry: dict[str, Any]) -> str:
    for key in ("image_id", "cocoid", "imgid"):
        if entry.get(key) is not None:
            return str(entry[key])
    return str(entry["filename"])
