"""The fields of an item that filters name (how SQL reaches them is ``indexer.fields``)."""

from __future__ import annotations

import re
from typing import Final, Literal, get_args

Kind = Literal["image", "caption", "video", "segment"]
KINDS: Final[tuple[str, ...]] = get_args(Kind)
COLUMNS: Final = frozenset({"kind", "group_id", "uri"})
# Metadata the indexer reads from a user's files (indexer/file_metadata.py) and always stores
# as text: `--where folder=2024` means the folder named "2024", not the number.
FILE_TEXT_FIELDS: Final = frozenset(
    {"path", "folder", "camera_make", "camera_model", "sha256", "mtime", "taken"}
)
# Also what keeps a metadata key safe to write into SQL text (indexer.fields.field_path).
FIELD_NAME: Final = re.compile(r"[A-Za-z0-9_]{1,64}")
ANY_OF: Final = "any_of"  # the filter language's OR: not a field name
