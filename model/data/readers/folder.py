"""A directory tree of images, each captioned by a same-named ``.txt`` file beside it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from model.data.readers.base import ImageReader
from model.data.records import CorpusError, ImageRecord

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FolderImageReader(ImageReader):
    """Every image under ``root`` (recursive, sorted) with captions from ``<stem>.txt``.

    The ``.txt`` holds one caption per non-empty line. The group id is the image's path
    relative to ``root`` without its extension (``cats/001``). A folder carries no split of its
    own: ``split``, when given, is recorded on every item as a label, nothing is filtered.
    A ``.txt`` without an image is not an item and is ignored. With
    ``captions_required=False`` an image without a caption (no ``.txt``, an empty or unreadable
    one) is an item with no captions rather than a skip.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
        split: str | None = None,
        captions_required: bool = True,
    ) -> None:
        super().__init__(root)
        self.captions_required = captions_required
        self.root = Path(root)
        if not self.root.is_dir():
            raise CorpusError(f"image folder {self.root} does not exist or is not a directory")
        self.extensions = frozenset(ext.lower() for ext in extensions)
        self.split = split

    def records(self) -> Iterator[ImageRecord]:
        report = self._start_pass()
        for path in self._image_paths():
            caption_path = path.with_suffix(".txt")
            try:
                text = caption_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = None
                if self.captions_required:
                    report.skip(str(path), "missing caption file", f"no {caption_path.name}")
                    continue
            except (OSError, UnicodeDecodeError) as error:
                text = None
                if self.captions_required:
                    report.skip(str(path), "unreadable caption file", f"{caption_path}: {error}")
                    continue
            lines = (line.strip() for line in (text or "").splitlines())
            captions = tuple(caption for caption in dict.fromkeys(lines) if caption)
            if not captions and self.captions_required:
                report.skip(str(path), "empty caption", f"{caption_path.name} has no text")
                continue
            yield ImageRecord(
                uri=str(path),
                captions=captions,
                group_id=path.relative_to(self.root).with_suffix("").as_posix(),
                split=self.split,
                path=path,
            )

    def _image_paths(self) -> list[Path]:
        # Sorted by relative posix path, so the order is the same on every platform.
        paths = (
            path
            for path in self.root.rglob("*")
            if path.suffix.lower() in self.extensions and path.is_file()
        )
        return sorted(paths, key=lambda path: path.relative_to(self.root).as_posix())
