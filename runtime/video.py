"""Videos to model inputs with NumPy + Pillow + PyAV, as training evaluates them. Torch-free.

Training (``training.video_data``) decodes ``decode_frames`` evenly spaced frames, fits each to the
image size and evaluates on the centre frame of each of ``frames`` equal segments; this does the
same, fitting only the frames it keeps (the fit is per frame, so the pixels are the same).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import InputError, VideoDecodeError
from runtime.images import preprocess_frames
from runtime.spec import ImageSpec, VideoSpec
from runtime.video_decode import read_video, sample_indices, segment_centres


def load_video(path: Path, video: VideoSpec, image: ImageSpec) -> np.ndarray:
    """Decode, sample and preprocess a video -> float32 [video.frames, 3, S, S].

    Raises :class:`InputError` for a missing file, a file PyAV cannot read, or one with no
    video stream or no decodable frame.
    """
    path = Path(path)
    try:
        frames, _fps, _seconds = read_video(path, video.decode_frames)
    except VideoDecodeError as error:
        raise InputError(f"{path}: {error.reason}{_detail(error, path)}") from error
    return preprocess_frames(frames[segment_centres(len(frames), video.frames)], image)


def _detail(error: VideoDecodeError, path: Path) -> str:
    # The reader's detail usually starts with the path, which the message already names.
    detail = error.detail.removeprefix(str(path)).removeprefix(": ")
    return f": {detail}" if detail else ""


def load_video_segments(
    path: Path, video: VideoSpec, image: ImageSpec, segment_seconds: float
) -> tuple[np.ndarray, list[tuple[float, float, np.ndarray]], float]:
    """One decode of a video for indexing: (whole-video frames as :func:`load_video` samples
    them, [(start_s, end_s, frames)] for consecutive segments of ``segment_seconds`` (the last
    one shorter), duration in seconds). Each segment's frames are the centres of ``video.frames``
    equal parts of it, so a search can answer with a moment."""
    path = Path(path)
    try:
        frames, fps, seconds = read_video(path)
    except VideoDecodeError as error:
        raise InputError(f"{path}: {error.reason}{_detail(error, path)}") from error
    count = len(frames)
    # read_video(path, decode_frames) keeps these frames; then training's segment centres.
    decoded = sample_indices(count, video.decode_frames)
    whole = frames[decoded[segment_centres(len(decoded), video.frames)]]
    per_second = count / seconds if seconds > 0 else (fps or 1.0)
    segments: list[tuple[float, float, np.ndarray]] = []
    start = 0.0
    while start < seconds or not segments:
        end = min(seconds, start + segment_seconds) if seconds > 0 else 0.0
        first = min(count - 1, int(start * per_second))
        last = max(first + 1, min(count, round(end * per_second)))
        picked = first + segment_centres(last - first, video.frames)
        segments.append((start, end, preprocess_frames(frames[picked], image)))
        start += segment_seconds
    return preprocess_frames(whole, image), segments, seconds
