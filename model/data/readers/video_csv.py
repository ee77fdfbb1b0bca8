"""Video files listed in a CSV, decoded with PyAV into uniformly sampled RGB frames."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from model.data.readers.base import BadItemError, CorpusReader
from model.data.readers.csv_reader import GroupedCsv
from model.data.records import VideoRecord, VideoSample
from runtime.errors import VideoDecodeError
from runtime.video_decode import read_video


class VideoCsvReader(CorpusReader[VideoRecord, VideoSample]):
    """Videos listed in a CSV, one row per (file, caption); same grouping as the image CSV.

    ``num_frames`` frames are sampled uniformly per video (None: every frame).
    ``captions_required=False``: see :class:`~model.data.readers.csv_reader.GroupedCsv`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        video_key: str = "filepath",
        caption_key: str = "caption",
        group_key: str | None = "video_id",
        split_key: str | None = "split",
        separator: str = ",",
        split: str | None = None,
        num_frames: int | None = 8,
        captions_required: bool = True,
    ) -> None:
        super().__init__(path)
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be a positive integer or None, got {num_frames}")
        self.num_frames = num_frames
        self.table = GroupedCsv(
            path,
            path_key=video_key,
            caption_key=caption_key,
            group_key=group_key,
            split_key=split_key,
            separator=separator,
            split=split,
            captions_required=captions_required,
        )

    def records(self) -> Iterator[VideoRecord]:
        report = self._start_pass()
        for item in self.table.items(report):
            yield VideoRecord(
                uri=str(item.path),
                captions=item.captions,
                group_id=item.group_id,
                path=item.path,
                split=item.split,
            )

    def decode(self, record: VideoRecord) -> VideoSample:
        try:
            frames, fps, duration = read_video(record.path, self.num_frames)
        except VideoDecodeError as error:
            raise BadItemError(error.reason, error.detail) from error
        return VideoSample(record=record, frames=frames, fps=fps, duration_s=duration)
