"""What an index build is asked to do: the request that ``cots index build``, a re-indexing job
and the Ray engine all take, so a job queued in Redis is the same JSON a command line makes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.bundle import Modality

CorpusKind = Literal["image", "caption", "video"]
# What a collection of each kind embeds: images, captions (text) or videos.
MODALITY: Final[dict[CorpusKind, Modality]] = {
    "image": "image",
    "caption": "text",
    "video": "video",
}


class BuildSpec(BaseModel):
    """One build of one collection into a new version under ``root / collection``."""

    model_config = ConfigDict(extra="forbid")

    collection: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    root: Path = Field(description="folder holding every collection")
    bundle: Path = Field(description="model bundle (cots export) that embeds the corpus")
    corpus: str = Field(description="corpus path: CSV/TSV, folder, WebDataset, Karpathy JSON")
    kind: CorpusKind = Field(
        "image",
        description="image: one vector per image; caption: one per caption (image→text); "
        "video: one per video plus one per segment",
    )
    split: str | None = Field(None, description="only this split of the corpus")
    factory: str = Field("auto", description="FAISS factory string, or auto (by size and memory)")
    memory_budget_mb: int | None = Field(None, ge=1, description="index memory budget for auto")
    segment_seconds: float = Field(2.0, gt=0, description="video segment length")
    shard_size: int = Field(2048, ge=1, description="items per resumable shard")
    workers: int = Field(2, ge=0, description="decoding processes (0: decode in the main one)")
    batch_size: int = Field(64, ge=1, description="items per encoder call")
    keep_versions: int = Field(3, ge=1, description="versions kept after a new one goes live")
    engine: Literal["local", "ray"] = "local"
    index_fields: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]] = Field(
        default_factory=list,
        max_length=16,
        description="metadata keys to index for filters (each segment's SQLite gets an index)",
    )
