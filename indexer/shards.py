"""The encoding half of a build: a corpus listed into records, cut into shards, and each shard
decoded (in worker processes) and encoded (here) into ids, vectors and metadata rows.

``indexer.build`` runs it (or ``indexer.ray_engine``'s Ray pipeline, which reuses its chunking,
preparing and embedding) and hands the saved shards to ``indexer.assemble``; ``indexer.update``
encodes an add with the same :class:`ShardEncoder`.

Image and video items need no caption (a caption, when the corpus has one, is stored); a
folder of them is listed by ``indexer.media_records``. Each image or video item carries the
metadata ``indexer.file_metadata`` reads from its file, from the bytes read once for decoding.

Item ids follow ``indexer.item_ids``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from tqdm import tqdm

from indexer.build_spec import MODALITY, BuildSpec, CorpusKind
from indexer.errors import CollectionError
from indexer.file_metadata import (
    file_fields,
    hash_media_file,
    image_fields,
    read_media_file,
    video_fields,
)
from indexer.item_ids import STRIDE, item_id
from indexer.media_records import list_media_folder, record_relpath, with_relpaths
from indexer.media_scan import heif_available
from indexer.metadata import Item
from model.data.readers import (
    BadItemError,
    ImageReader,
    VideoCsvReader,
    is_shard_directory,
    open_image_corpus,
)
from model.data.records import CorpusError, ImageRecord, VideoRecord
from runtime.bundle import Modality
from runtime.encoder import Encoder
from runtime.errors import ImageDecodeError, InputError
from runtime.image_decode import BoundedImage, decode_image_bounded
from runtime.images import ACCEPTED_FORMATS, preprocess_images
from runtime.spec import ImageSpec, VideoSpec
from runtime.video import load_video_segments

logger = logging.getLogger("cots.index")

Progress = Callable[[int, int, str], None]
Record = ImageRecord | VideoRecord
# What a build decodes: the runtime's formats, and HEIC/AVIF when pillow-heif registered them.
INDEX_FORMATS: Final = (*ACCEPTED_FORMATS, "HEIF", "AVIF")


def index_min_side(size: int) -> int:
    """The shorter side an image is decoded to at least, for a model of input ``size``: far
    above it (the model resizes it to ``size``), far under a 100-megapixel photo's."""
    return max(1024, 4 * size)


@dataclass
class Chunk:
    """Items of consecutive records ready for the encoder (inputs aligned with items)."""

    items: list[Item] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)  # pixels [3,S,S], frames [T,3,S,S] or texts
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (uri, reason)


# Listing ----------------------------------------------------------------------------------------


def list_records(spec: BuildSpec) -> tuple[list[Record], dict[str, int]]:
    """Every usable record of the corpus (split applied) in corpus order, and the items the
    listing itself skipped (missing files, empty captions, not media, ...) per reason.

    Images and videos need no caption; a folder of them is scanned for media files
    (``indexer.media_records``). A caption collection needs captions, and says so when the
    corpus has none.
    """
    corpus = Path(spec.corpus)
    if spec.kind != "caption" and corpus.is_dir() and not is_shard_directory(corpus):
        return list_media_folder(corpus, spec.kind, spec.split)
    captions_required = spec.kind == "caption"
    try:
        reader: VideoCsvReader | ImageReader
        if spec.kind == "video":
            reader = VideoCsvReader(
                corpus,
                split=spec.split,
                num_frames=None,
                separator="\t" if corpus.suffix.lower() == ".tsv" else ",",
                captions_required=False,
            )
        else:
            reader = open_image_corpus(
                spec.corpus, split=spec.split, captions_required=captions_required
            )
        records: list[Record] = list(reader.records())
    except CorpusError as error:
        hint = _CAPTIONS_HINT if captions_required and "caption" in str(error) else ""
        raise CollectionError(f"cannot read corpus {spec.corpus}: {error}{hint}") from None
    skipped = dict(reader.report.skipped)
    if captions_required and not records and _NO_CAPTION_REASONS & skipped.keys():
        found = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(skipped.items()))
        raise CollectionError(f"corpus {spec.corpus} has no captions ({found}){_CAPTIONS_HINT}")
    # A corpus file's items are named relative to its folder (their ``path`` metadata).
    root = corpus if corpus.is_dir() else corpus.parent
    return with_relpaths(records, root), skipped


_NO_CAPTION_REASONS: Final = frozenset({"missing caption file", "empty caption"})
_CAPTIONS_HINT: Final = (
    "; --kind caption embeds captions (a <stem>.txt beside each image, or a caption column), "
    "while --kind image indexes the images without them"
)


# Preparing chunks (runs in worker processes) ------------------------------------------------------


def prepare_chunk(
    kind: CorpusKind,
    numbered: Sequence[tuple[int, Record]],
    image: ImageSpec,
    video: VideoSpec,
    segment_seconds: float,
) -> Chunk:
    """Decode and preprocess records (numbered by their record index) into encoder inputs."""
    chunk = Chunk()
    if kind == "image":
        heif_available()  # registers pillow-heif's decoder in this worker, when installed
    for number, record in numbered:
        try:
            if kind == "image":
                _prepare_image(chunk, number, record, image)
            elif kind == "caption":
                _prepare_captions(chunk, number, record)
            else:
                _prepare_video(chunk, number, record, image, video, segment_seconds)
        except (BadItemError, InputError) as error:
            chunk.skipped.append((record.uri, str(error)))
    return chunk


def _metadata(record: Record) -> dict[str, Any]:
    return {"split": record.split} if record.split else {}


def _prepare_image(chunk: Chunk, number: int, record: Record, image: ImageSpec) -> None:
    assert isinstance(record, ImageRecord)
    if record.data is not None:
        data, stat = record.data, None  # an archive member: no file of its own
    elif record.path is not None:
        data, stat = read_media_file(record.path)
    else:
        raise BadItemError("missing file", f"{record.uri}: record has neither path nor data")
    decoded = decode_for_index(data, image)
    # to_rgb (inside) applies the EXIF orientation: the one path queries take too.
    pixels = preprocess_images([decoded.image], image)[0]
    sha256 = hashlib.sha256(data).hexdigest()
    metadata = _metadata(record)
    metadata |= file_fields(record_relpath(record), stat, size=len(data), sha256=sha256)
    metadata |= image_fields(decoded.image, decoded.full_size)
    caption = record.captions[0] if record.captions else None
    chunk.items.append(
        Item(
            id=item_id("image", number),
            kind="image",
            uri=record.uri,
            caption=caption,
            group_id=record.group_id,
            metadata=metadata,
        )
    )
    chunk.inputs.append(pixels)


def decode_for_index(data: bytes, image: ImageSpec) -> BoundedImage:
    """An image file's bytes decoded for indexing, memory bounded however large the photo
    (``runtime.image_decode.decode_image_bounded``); :class:`BadItemError` when unusable."""
    try:
        return decode_image_bounded(
            data, min_side=index_min_side(image.size), formats=INDEX_FORMATS
        )
    except ImageDecodeError as error:
        if error.reason == "truncated image":
            # Skip reports count a truncated file as a corrupt image, as the readers do.
            raise BadItemError("corrupt image", str(error)) from error
        raise BadItemError(error.reason, error.detail) from error


def _prepare_captions(chunk: Chunk, number: int, record: Record) -> None:
    if len(record.captions) > STRIDE["caption"]:
        raise BadItemError("too many captions", f"{len(record.captions)} > {STRIDE['caption']}")
    for position, caption in enumerate(record.captions):
        chunk.items.append(
            Item(
                id=item_id("caption", number, position),
                kind="caption",
                uri=record.uri,
                caption=caption,
                group_id=record.group_id,
                metadata=_metadata(record),
            )
        )
        chunk.inputs.append(caption)


def _prepare_video(
    chunk: Chunk,
    number: int,
    record: Record,
    image: ImageSpec,
    video: VideoSpec,
    segment_seconds: float,
) -> None:
    assert isinstance(record, VideoRecord)
    # Hashed in blocks, apart from decoding: a video need not fit in memory, and PyAV reads the
    # file itself (the second read comes from the page cache).
    sha256, stat = hash_media_file(record.path)
    whole, segments, seconds = load_video_segments(record.path, video, image, segment_seconds)
    if len(segments) >= STRIDE["video"]:
        raise BadItemError("too long", f"{len(segments)} segments")
    base = item_id("video", number)
    caption = record.captions[0] if record.captions else None
    metadata = _metadata(record)
    metadata |= file_fields(record_relpath(record), stat, size=stat.st_size, sha256=sha256)
    metadata |= video_fields(record.path, seconds)
    common = {"uri": record.uri, "group_id": record.group_id, "metadata": metadata}
    chunk.items.append(
        Item(id=base, kind="video", caption=caption, start_s=0.0, end_s=seconds, **common)
    )
    chunk.inputs.append(whole)
    if len(segments) == 1:
        return  # one segment spanning the video would only repeat it in every result list
    for position, (start, end, frames) in enumerate(segments, start=1):
        chunk.items.append(
            Item(
                id=item_id("video", number, position),
                kind="segment",
                caption=None,
                start_s=start,
                end_s=end,
                **common,
            )
        )
        chunk.inputs.append(frames)


# Encoding shards --------------------------------------------------------------------------------


@dataclass
class Shard:
    ids: np.ndarray  # int64 [N]
    vectors: np.ndarray  # float32 [N, D]
    items: list[Item]
    skipped: list[tuple[str, str]]

    def save(self, path: Path) -> None:
        """Atomically: a shard file exists only once it is complete."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as file:
            np.savez(
                file,
                ids=self.ids,
                vectors=self.vectors,
                items=np.array(json.dumps([item.model_dump() for item in self.items])),
                skipped=np.array(json.dumps(self.skipped)),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Shard:
        with np.load(path) as data:
            items = [Item.model_validate(i) for i in json.loads(str(data["items"]))]
            skipped = [tuple(s) for s in json.loads(str(data["skipped"]))]
            return cls(data["ids"], data["vectors"], items, skipped)  # type: ignore[arg-type]

    @classmethod
    def join(cls, parts: Sequence[Shard], dim: int) -> Shard:
        """One shard from consecutive parts (chunks) in record order; logs their skipped items."""
        items = [item for part in parts for item in part.items]
        skipped = [entry for part in parts for entry in part.skipped]
        for uri, reason in skipped:
            logger.warning("skipped %s (%s)", uri, reason)
        vectors = [part.vectors for part in parts if part.items]
        stacked = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
        return cls(np.array([item.id for item in items], dtype=np.int64), stacked, items, skipped)


def chunk_records(
    spec: BuildSpec, numbered: Sequence[tuple[int, Record]]
) -> list[Sequence[tuple[int, Record]]]:
    """The chunks both engines cut a shard into: a batch of records (an eighth for videos,
    whose segments multiply the inputs)."""
    size = max(1, spec.batch_size // (8 if spec.kind == "video" else 1))
    return [numbered[i : i + size] for i in range(0, len(numbered), size)]


def embed_chunk(encoder: Encoder, modality: Modality, chunk: Chunk, batch_size: int) -> Shard:
    """A chunk's embeddings as a (partial) shard, the model called ``batch_size`` at a time."""
    if not chunk.items:
        vectors = np.zeros((0, encoder.dim), np.float32)
    elif modality == "text":
        vectors = encoder.encode_texts(chunk.inputs)
    else:
        vectors = np.concatenate(
            [
                encoder.run(modality, np.stack(chunk.inputs[start : start + batch_size]))
                for start in range(0, len(chunk.inputs), batch_size)
            ]
        )
    ids = np.array([item.id for item in chunk.items], dtype=np.int64)
    return Shard(ids, vectors, chunk.items, chunk.skipped)


class ShardEncoder:
    """Turns numbered records into shards: decoding in worker processes, encoding here."""

    def __init__(self, spec: BuildSpec, encoder: Encoder) -> None:
        self.spec = spec
        self.encoder = encoder
        self.modality = MODALITY[spec.kind]
        manifest = encoder.manifest
        self._args = (spec.kind, manifest.image, manifest.video, spec.segment_seconds)
        # Spawned, not forked: the parent holds ONNX Runtime threads, which do not survive fork.
        self._pool = (
            multiprocessing.get_context("spawn").Pool(spec.workers)
            if spec.workers > 0 and spec.kind != "caption"
            else None
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()

    def __enter__(self) -> ShardEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _chunks(self, numbered: Sequence[tuple[int, Record]]) -> Iterator[Chunk]:
        """Prepared chunks in order; with a pool, at most 2 * workers chunks in flight, so
        decoding runs ahead of encoding without holding a whole shard of pixels."""
        parts = chunk_records(self.spec, numbered)
        if self._pool is None:
            for part in parts:
                yield prepare_chunk(self._args[0], part, *self._args[1:])
            return
        pending: deque[Any] = deque()
        for part in parts:
            pending.append(
                self._pool.apply_async(prepare_chunk, (self._args[0], part, *self._args[1:]))
            )
            if len(pending) >= 2 * self.spec.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def encode(self, numbered: Sequence[tuple[int, Record]], bar: tqdm | None = None) -> Shard:
        parts = []
        for chunk in self._chunks(numbered):
            parts.append(embed_chunk(self.encoder, self.modality, chunk, self.spec.batch_size))
            if bar is not None:
                bar.update(len({item.uri for item in chunk.items}) + len(chunk.skipped))
        return Shard.join(parts, self.encoder.dim)


# Encoding a build's shards -------------------------------------------------------------------


def shard_path(work: Path, index: int) -> Path:
    return work / f"shard-{index:06d}.npz"


def encode_shards_locally(
    spec: BuildSpec,
    records: list[Record],
    work: Path,
    progress: Progress | None,
    bar_shown: bool = True,
) -> list[Path]:
    """Encode every shard not saved yet; returns all shard paths in order (``bar_shown``:
    the terminal's progress bar; ``progress`` reports to a job either way)."""
    numbered = list(enumerate(records))
    plan = ShardPlan.scan(spec, len(numbered), work)
    # build_collection has just hashed the bundle's files; hashing them again costs seconds for
    # a large model and proves nothing new.
    encoder = Encoder(spec.bundle, batch_size=spec.batch_size, verify=False)
    bar = tqdm(
        total=plan.total,
        initial=plan.done,
        desc=f"indexing {spec.collection}",
        unit="item",
        disable=not bar_shown,
    )
    with bar, ShardEncoder(spec, encoder) as shards:
        for shard in plan.pending:
            start, end = plan.bounds(shard)
            shards.encode(numbered[start:end], bar).save(plan.paths[shard])
            if progress is not None:
                progress(end, plan.total, "encoding")
    return plan.paths


@dataclass(frozen=True)
class ShardPlan:
    """Which shards of a build exist already and which are still to encode."""

    shard_size: int
    total: int  # records
    paths: list[Path]  # every shard, in order
    pending: list[int]  # shards without a file yet

    @classmethod
    def scan(cls, spec: BuildSpec, total: int, work: Path) -> ShardPlan:
        count = -(-total // spec.shard_size)
        paths = [shard_path(work, i) for i in range(count)]
        pending = [i for i, path in enumerate(paths) if not path.is_file()]
        plan = cls(spec.shard_size, total, paths, pending)
        if plan.done:
            logger.info("resuming: %d of %d records already encoded", plan.done, total)
        return plan

    def bounds(self, shard: int) -> tuple[int, int]:
        """Record indices [start, end) of a shard."""
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.total)

    @property
    def done(self) -> int:
        """Records in the shards already saved."""
        return self.total - sum(end - start for start, end in map(self.bounds, self.pending))


def skipped_summary(
    shards: Sequence[Shard], listed: dict[str, int] | None = None
) -> dict[str, int]:
    """Skipped items per reason category (the text before the first colon), the listing's
    skips included."""
    counts = Counter(listed or {})
    counts.update(reason.split(":")[0] for shard in shards for _, reason in shard.skipped)
    return dict(counts)
