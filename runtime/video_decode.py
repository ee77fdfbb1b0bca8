"""Videos to uint8 RGB frames with PyAV, and the frame sampling training and serving share.

Torch-free: the corpus reader (``model.data.readers.video_csv``), training's video dataset
and the runtime's ``load_video`` all sample with these, so a video means the same frames
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtime.errors import VideoDecodeError

if TYPE_CHECKING:
    from av.container import InputContainer
    from av.video.stream import VideoStream

_AV_TIME_BASE = 1_000_000  # av.time_base: container durations are in microseconds


def sample_indices(n_frames: int, num_frames: int) -> np.ndarray:
    """``num_frames`` indices spread evenly over ``n_frames`` frames, first and last included.

    A video shorter than ``num_frames`` repeats frames rather than padding with black.
    """
    return np.linspace(0, n_frames - 1, num_frames).round().astype(np.int64)


def segment_centres(available: int, count: int) -> np.ndarray:
    """``count`` non-decreasing indices into ``available`` frames: each segment's centre frame.

    The frames are cut into ``count`` equal segments. With at least as many frames as segments
    the bounds are integers, so every segment holds a frame of its own and the indices strictly
    increase; with fewer, each index is the frame its segment's centre falls on, and frames
    repeat.
    """
    if available < 1 or count < 1:
        raise ValueError(f"need available >= 1 and count >= 1, got {available}, {count}")
    if available >= count:
        bounds = np.arange(count + 1, dtype=np.int64) * available // count
        return bounds[:-1] + (bounds[1:] - bounds[:-1]) // 2
    positions = np.arange(count, dtype=np.float64) + 0.5
    indices = (positions * available / count).astype(np.int64)
    return np.minimum(indices, available - 1)


def read_video(path: str | Path, num_frames: int | None = None) -> tuple[np.ndarray, float, float]:
    """Decode a video into uint8 RGB frames of shape (T, H, W, 3); return (frames, fps, seconds).

    With ``num_frames``, T == num_frames, sampled uniformly over the whole video; otherwise
    every frame. Raises :class:`VideoDecodeError` ("missing file" or "corrupt video") when the
    file is absent, cannot be opened or decoded, or has no video stream or no frames.
    """
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer or None, got {num_frames}")
    path = Path(path)
    if not path.is_file():
        raise VideoDecodeError("missing file", str(path))
    try:
        decoded = _decode(path, num_frames, total=None)
        if decoded.frames is None:
            # The container's frame count was absent or wrong; the first pass counted them.
            decoded = _decode(path, num_frames, total=decoded.count)
        frames = decoded.frames
        if frames is None:  # cannot happen with a known total; keeps the type checker honest
            raise VideoDecodeError("corrupt video", f"{path}: frame count changed between passes")
        return np.stack(frames), decoded.fps, decoded.duration
    except VideoDecodeError:
        raise
    except Exception as error:
        # PyAV raises its own error types for unreadable data (and ValueError for frames of
        # changing size); either way only this video is unusable.
        detail = f"{path}: {type(error).__name__}: {error}"
        raise VideoDecodeError("corrupt video", detail) from error


@dataclass(frozen=True, slots=True)
class _Decoded:
    frames: list[np.ndarray] | None  # None: sampled frames not known yet, see _decode
    count: int
    fps: float
    duration: float


def _decode(path: Path, num_frames: int | None, total: int | None) -> _Decoded:
    """One decoding pass; converts to RGB only the frames it keeps, to bound memory.

    ``frames`` is None when sampling was asked for but the frame count was not known up front.
    """
    import av  # deferred: importing PyAV costs ~0.15 s, and image-only users never need it

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError("corrupt video", f"{path}: no video stream")
        stream = container.streams.video[0]
        expected = total if total is not None else stream.frames
        wanted: set[int] | None = None
        if num_frames is not None and expected > 0:
            wanted = set(sample_indices(expected, num_frames).tolist())
        kept: dict[int, np.ndarray] = {}
        count = 0
        for frame in container.decode(stream):
            if num_frames is None or (wanted is not None and count in wanted):
                kept[count] = frame.to_ndarray(format="rgb24")
            count += 1
        if count == 0:
            raise VideoDecodeError("corrupt video", f"{path}: no decodable frames")
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        duration = _duration(container, stream)
    if duration <= 0 and fps > 0:
        duration = count / fps
    if fps <= 0 < duration:
        fps = count / duration
    if num_frames is None:
        return _Decoded([kept[i] for i in range(count)], count, fps, duration)
    if wanted is None or count != expected:
        return _Decoded(None, count, fps, duration)
    sampled = [kept[i] for i in sample_indices(count, num_frames).tolist()]
    return _Decoded(sampled, count, fps, duration)


def _duration(container: InputContainer, stream: VideoStream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / _AV_TIME_BASE
    return 0.0
