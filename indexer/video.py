"""Videos to model inputs with NumPy + Pillow + PyAV, as training evaluates them. Torch-free.

Training (``model.video_data``) decodes ``decode_frames`` evenly spaced frames, fits each to the
image size and evaluates on the centre frame of each of ``frames`` equal segments; this does the
same, fitting only the frames it keeps (the fit is per frame, so the pixels are the same).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from indexer.errors import InputError
from indexer.images import preprocess_frames
from indexer.spec import ImageSpec, VideoSpec
from model.data.readers.base import BadItemError
from model.data.readers.video_csv import read_video, segment_centres


def load_video(path: Path, video: VideoSpec, image: ImageSpec) -> np.ndarray:
    """Decode, sample and preprocess a video -> float32 [video.frames, 3, S, S].

    Raises :class:`InputError` for a missing file, a file PyAV cannot read, or one with no
    video stream or no decodable frame.
    """
    path = Path(path)
    try:
        frames, _fps, _seconds = read_video(path, video.decode_frames)
    except BadItemError as error:
        raise InputError(f"{path}: {error.reason}{_detail(error, path)}") from error
    return preprocess_frames(frames[segment_centres(len(frames), video.frames)], image)


def _detail(error: BadItemError, path: Path) -> str:
    # The reader's detail usually starts with the path, which the message already names.
    detail = error.detail.removeprefix(str(path)).removeprefix(": ")
    return f": {detail}" if detail else ""
