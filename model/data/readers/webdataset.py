"""WebDataset shards: tar files whose members sharing a key form one item."""

from __future__ import annotations

import itertools
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from model.data.readers.base import ImageReader
from model.data.records import CorpusError, ImageRecord, SkipReport

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a key has several

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# webdataset's convention: the key is the name up to the first dot of the basename.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{000..009}`` numeric ranges and ``{a,b}`` lists, left to right, as a shell does.

    A range is zero-padded to the wider bound when either bound is written with a leading zero.
    """
    match = _BRACE.search(pattern)
    if match is None:
        if "{" in pattern or "}" in pattern:
            raise CorpusError(f"unbalanced braces in shard pattern {pattern!r}")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        head + choice + rest
        for choice in _brace_choices(match.group(1), pattern)
        for rest in expand_braces(tail)
    ]


def _brace_choices(body: str, pattern: str) -> list[str]:
    if "," in body:
        return body.split(",")
    match = _RANGE.match(body)
    if match is None:
        raise CorpusError(
            f"cannot expand {{{body}}} in shard pattern {pattern!r}; "
            "expected a numeric range such as {000..009} or a list such as {a,b}"
        )
    first, last = match.groups()
    start, stop = int(first), int(last)
    if stop < start:
        raise CorpusError(f"descending range {{{body}}} in shard pattern {pattern!r}")
    # As bash does: "{00..10}" pads to two digits, "{0..10}" does not pad.
    padded = any(re.match(r"-?0\d", bound) for bound in (first, last))
    width = max(len(first), len(last)) if padded else 0
    return [str(number).zfill(width) for number in range(start, stop + 1)]


def is_shard_pattern(path: str) -> bool:
    return bool(_BRACE.search(path))


def _split_member(name: str) -> tuple[str, str] | None:
    match = _MEMBER.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


class WebDatasetImageReader(ImageReader):
    """Image/caption items from WebDataset shards, read sequentially in streaming mode.

    ``shards`` is one ``.tar``, a brace pattern (``shards/{000..009}.tar``) or a directory of
    ``.tar`` files. An item is ``<key>.<jpg|jpeg|png|webp>`` + ``<key>.txt`` (one caption per
    non-empty line) + an optional ``<key>.json`` that may give ``image_id`` (or ``group_id``)
    and ``split``. Members of one key must be adjacent, as webdataset writes them. A shard
    that cannot be read is reported as one skip and the next shard is read. ``split`` keeps
    only items whose json names that split. With ``captions_required=False`` an image without
    a ``.txt`` (or with an empty one) is an item with no captions rather than a skip.
    """

    def __init__(
        self, shards: str | Path, *, split: str | None = None, captions_required: bool = True
    ) -> None:
        super().__init__(shards)
        self.shards = _resolve_shards(str(shards))
        self.split = split
        self.captions_required = captions_required

    def records(self) -> Iterator[ImageRecord]:
        report = self._start_pass()
        for shard in self.shards:
            if not shard.is_file():
                report.skip(str(shard), "missing shard")
                continue
            try:
                for key, fields in _grouped_members(shard):
                    record = self._record(shard, key, fields, report)
                    if record is not None:
                        yield record
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                report.skip(str(shard), "corrupt shard", f"{type(error).__name__}: {error}")

    def _record(
        self, shard: Path, key: str, fields: dict[str, bytes], report: SkipReport
    ) -> ImageRecord | None:
        where = f"{shard}#{key}"
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in fields), None)
        if image_ext is None:
            report.skip(where, "missing image", f"members: {sorted(fields)}")
            return None
        if "txt" not in fields and self.captions_required:
            report.skip(where, "missing caption file", f"no {key}.txt")
            return None
        try:
            text = fields["txt"].decode("utf-8") if "txt" in fields else ""
            meta = json.loads(fields["json"]) if "json" in fields else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            report.skip(where, "unreadable caption or metadata", str(error))
            return None
        if not isinstance(meta, dict):
            report.skip(where, "unreadable caption or metadata", f"{key}.json is not an object")
            return None
        split = meta.get("split")
        split = str(split) if split else None
        if self.split is not None and split != self.split:
            return None
        lines = (line.strip() for line in text.splitlines())
        captions = tuple(caption for caption in dict.fromkeys(lines) if caption)
        if not captions and self.captions_required:
            report.skip(where, "empty caption", f"{key}.txt has no text")
            return None
        group_id = meta.get("image_id", meta.get("group_id"))
        return ImageRecord(
            uri=f"{shard}#{key}.{image_ext}",
            captions=captions,
            group_id=key if group_id is None else str(group_id),
            split=split,
            data=fields[image_ext],
        )


def _resolve_shards(shards: str) -> list[Path]:
    if is_shard_pattern(shards):
        paths = [Path(name) for name in expand_braces(shards)]
        if not any(path.is_file() for path in paths):
            raise CorpusError(f"no shard of pattern {shards!r} exists ({len(paths)} names)")
        return paths
    path = Path(shards)
    if path.is_dir():
        paths = sorted(p for p in path.iterdir() if p.suffix.lower() == ".tar" and p.is_file())
        if not paths:
            raise CorpusError(f"shard directory {path} holds no .tar files")
        return paths
    if not path.is_file():
        raise CorpusError(f"WebDataset shard {path} does not exist")
    return [path]


def _grouped_members(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {extension: bytes}) for runs of adjacent members sharing a key."""
    wanted = {*IMAGE_EXTENSIONS, "txt", "json"}
    with tarfile.open(shard, mode="r|*") as tar:
        named = ((member, _split_member(member.name)) for member in tar if member.isfile())
        keyed = ((member, parts) for member, parts in named if parts is not None)
        for key, run in itertools.groupby(keyed, key=lambda pair: pair[1][0]):
            fields: dict[str, bytes] = {}
            for member, (_, ext) in run:
                if ext in wanted:
                    # Streaming mode: a member's data must be read before the next one.
                    file = tar.extractfile(member)
                    data = file.read() if file is not None else b""
                    # A stream cut inside a member reads short instead of failing.
                    if len(data) != member.size:
                        raise tarfile.ReadError(
                            f"unexpected end of data in {member.name}: "
                            f"{len(data)} of {member.size} bytes"
                        )
                    fields[ext] = data
            yield key, fields
