"""CSV corpora in the open_clip layout: one row per (file, caption), column names configurable."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from model.data.readers.base import ImageReader
from model.data.records import CorpusError, ImageRecord, SkipReport


@dataclass(frozen=True, slots=True)
class CsvItem:
    """One file of a CSV corpus with the captions of all its rows."""

    path: Path
    captions: tuple[str, ...]
    group_id: str
    split: str | None


@dataclass
class _Group:
    path: Path
    group_id: str
    split: str | None
    captions: dict[str, None] = field(default_factory=dict)  # a dict keeps first-seen order


class GroupedCsv:
    """A CSV whose rows pair a file with a caption; rows naming the same file are one item.

    Shared by the image and the video CSV readers. The header is checked here, up front: a
    missing file or a missing ``path_key``/``caption_key`` column raises :class:`CorpusError`.
    ``group_key`` and ``split_key`` are optional columns; when absent the group is the file path
    as written and the split is ``None``. With ``captions_required=False`` (indexing images or
    videos, which need no text) the caption column is optional too, and a file without a
    caption is an item with none rather than a skip.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        path_key: str,
        caption_key: str,
        group_key: str | None,
        split_key: str | None,
        separator: str,
        split: str | None,
        captions_required: bool = True,
    ) -> None:
        self.path = Path(path)
        self.path_key = path_key
        self.separator = separator
        self.split = split
        self.captions_required = captions_required
        header = self._read_header()
        self.caption_key: str | None = caption_key
        if not captions_required and caption_key not in header:
            self.caption_key = None
        required = ((path_key, "file path"), (self.caption_key, "caption"))
        for key, role in required:
            if key is not None and key not in header:
                raise CorpusError(f"{self.path}: no {role} column {key!r}; the header has {header}")
        self.group_key = group_key if group_key in header else None
        self.split_key = split_key if split_key in header else None
        if split is not None and self.split_key is None:
            raise CorpusError(
                f"{self.path}: cannot select split {split!r}: no split column {split_key!r}; "
                f"the header has {header}"
            )

    def _read_header(self) -> list[str]:
        if not self.path.is_file():
            raise CorpusError(f"CSV corpus {self.path} does not exist or is not a file")
        try:
            # utf-8-sig: spreadsheet exports often start with a byte-order mark.
            with self.path.open(newline="", encoding="utf-8-sig") as file:
                header = next(csv.reader(file, delimiter=self.separator), None)
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise CorpusError(f"cannot read CSV corpus {self.path}: {error}") from error
        if not header:
            raise CorpusError(f"CSV corpus {self.path} is empty; expected a header row")
        return [name.strip() for name in header]

    def items(self, report: SkipReport) -> Iterator[CsvItem]:
        """Yield one item per distinct file, in first-seen order, its captions de-duplicated.

        Rows with an empty caption are reported; a file left with no caption, or missing on
        disk, is reported and not yielded (captions not required: only a missing file is).
        """
        for group in self._read_groups(report).values():
            if not group.captions and self.captions_required:
                continue  # its empty rows are already reported
            if not group.path.is_file():
                report.skip(str(group.path), "missing file", f"listed in {self.path}")
                continue
            yield CsvItem(group.path, tuple(group.captions), group.group_id, group.split)

    def _read_groups(self, report: SkipReport) -> dict[str, _Group]:
        # Rows of one file need not be adjacent, so the whole table is grouped before yielding.
        groups: dict[str, _Group] = {}
        root = self.path.parent
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as file:
                rows = csv.DictReader(file, delimiter=self.separator)
                rows.fieldnames = [name.strip() for name in rows.fieldnames or []]
                for row in rows:
                    where = f"line {rows.line_num} of {self.path}"
                    split = self._cell(row, self.split_key) or None
                    if self.split is not None and split != self.split:
                        continue
                    file_value = self._cell(row, self.path_key)
                    if not file_value:
                        report.skip(where, "empty file path")
                        continue
                    group = groups.get(file_value)
                    if group is None:
                        group_id = self._cell(row, self.group_key) or file_value
                        # Absolute paths stay as they are; relative ones are under the CSV's dir.
                        group = _Group(root / file_value, group_id, split)
                        groups[file_value] = group
                    caption = self._cell(row, self.caption_key)
                    if caption:
                        group.captions[caption] = None
                    elif self.captions_required:
                        report.skip(str(group.path), "empty caption", where)
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise CorpusError(f"cannot read CSV corpus {self.path}: {error}") from error
        return groups

    @staticmethod
    def _cell(row: dict[str, str | None], key: str | None) -> str:
        if key is None:
            return ""
        value = row.get(key)
        return value.strip() if value else ""


class CsvImageReader(ImageReader):
    """Images listed in a CSV (open_clip's ``--csv-img-key``/``--csv-caption-key`` layout).

    Paths are relative to the CSV's directory unless absolute. Rows naming the same file are one
    image with several captions. ``split`` keeps only rows whose split column equals it.
    ``captions_required=False``: see :class:`GroupedCsv`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        img_key: str = "filepath",
        caption_key: str = "caption",
        group_key: str | None = "image_id",
        split_key: str | None = "split",
        separator: str = ",",
        split: str | None = None,
        captions_required: bool = True,
    ) -> None:
        super().__init__(path)
        self.table = GroupedCsv(
            path,
            path_key=img_key,
            caption_key=caption_key,
            group_key=group_key,
            split_key=split_key,
            separator=separator,
            split=split,
            captions_required=captions_required,
        )

    def records(self) -> Iterator[ImageRecord]:
        report = self._start_pass()
        for item in self.table.items(report):
            yield ImageRecord(
                uri=str(item.path),
                captions=item.captions,
                group_id=item.group_id,
                split=item.split,
                path=item.path,
            )
