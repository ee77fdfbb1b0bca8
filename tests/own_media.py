"""A user's photo folder as tests meet it: nested folders of JPEGs with EXIF dates, cameras and
places, one photo stored sideways (EXIF orientation 6) beside an upright copy, planted
near-duplicates, a few PNG/WebP/GIF files, two short videos, a text file, a hidden file and
a broken JPEG; no captions anywhere.

Every photo's pixels are a random 4x4 colour grid blown up, so no two photos look alike
except the planted pairs; :class:`Planted` says what the folder holds, for the assertions.
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import av
import numpy as np
from PIL import ExifTags, Image

CAMERAS = (("Canon", "EOS R6"), ("Apple", "iPhone 15"), ("FUJIFILM", "X-T5"))
FOLDERS = ("2023/spring", "2023/summer", "holidays/2024", "holidays/2024/beach", "phone")
START = datetime(2023, 3, 1, 9, 30)


@dataclass
class Planted:
    """What the generated folder holds, by path relative to its root."""

    photos: list[str] = field(default_factory=list)  # every decodable image, duplicates too
    taken: dict[str, str] = field(default_factory=dict)  # path -> ISO date taken
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # planted pairs
    rotated: str = ""  # stored sideways with EXIF orientation 6
    upright: str = ""  # the same photo stored upright
    videos: list[str] = field(default_factory=list)
    broken: str = ""  # a truncated JPEG
    not_media: list[str] = field(default_factory=list)


def grid_image(rng: np.random.Generator, size: tuple[int, int] = (96, 72)) -> Image.Image:
    cells = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR)


def exif_for(taken: datetime, camera: tuple[str, str], orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = camera
    exif[ExifTags.Base.Orientation] = orientation
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken.strftime(
        "%Y:%m:%d %H:%M:%S"
    )
    return exif


def save_jpeg(
    image: Image.Image, path: Path, taken: datetime, camera: tuple[str, str], **kwargs: int
) -> None:
    orientation = kwargs.pop("orientation", 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(
        path, "JPEG", quality=kwargs.pop("quality", 92), exif=exif_for(taken, camera, orientation)
    )


def write_video(path: Path, seed: int, frames: int = 16) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(frames):
            frame = np.asarray(grid_image(rng, (32, 32)))
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_photo_folder(root: Path, n_jpegs: int = 200, seed: int = 7) -> Planted:
    """Write the folder under ``root``; returns what it holds."""
    rng = np.random.default_rng(seed)
    planted = Planted()

    def add(relpath: str, taken: datetime | None) -> None:
        planted.photos.append(relpath)
        if taken is not None:
            planted.taken[relpath] = taken.isoformat(timespec="seconds")

    originals: dict[str, Image.Image] = {}
    for number in range(n_jpegs - 5):  # 5 more JPEGs are the planted copies below
        relpath = f"{FOLDERS[number % len(FOLDERS)]}/IMG_{number:04d}.jpg"
        taken = START + timedelta(days=3 * number, minutes=number)
        image = grid_image(rng)
        originals[relpath] = image
        save_jpeg(image, root / relpath, taken, CAMERAS[number % len(CAMERAS)])
        add(relpath, taken)
    first, second, third = list(originals)[:3]
    # Planted near-duplicates: a byte copy, a lower-quality re-save and a smaller copy.
    (root / "copies").mkdir()
    shutil.copyfile(root / first, root / "copies/IMG_0000 copy.jpg")
    save_jpeg(originals[second], root / "copies/IMG_0001-small.jpg", START, CAMERAS[0], quality=70)
    save_jpeg(
        originals[third].resize((86, 65)), root / "copies/IMG_0002-resized.jpg", START, CAMERAS[0]
    )
    for relpath, source in (
        ("copies/IMG_0000 copy.jpg", first),
        ("copies/IMG_0001-small.jpg", second),
        ("copies/IMG_0002-resized.jpg", third),
    ):
        add(
            relpath,
            START if "copy" not in relpath else datetime.fromisoformat(planted.taken[source]),
        )
        planted.duplicates.append((source, relpath))
    # One photo stored sideways as phones do (the pixels rotated, EXIF orientation 6 says
    # "turn me 90° clockwise"), and the same photo stored upright.
    upright = grid_image(rng)
    planted.upright, planted.rotated = "phone/upright.jpg", "phone/sideways.jpg"
    save_jpeg(upright, root / planted.upright, START, CAMERAS[1])
    save_jpeg(
        upright.transpose(Image.Transpose.ROTATE_90),
        root / planted.rotated,
        START,
        CAMERAS[1],
        orientation=6,
    )
    add(planted.upright, START)
    add(planted.rotated, START)
    planted.duplicates.append((planted.upright, planted.rotated))
    # Other formats: distinct photos without EXIF.
    for relpath, fmt in (
        ("scans/scan.png", "PNG"),
        ("scans/web.webp", "WEBP"),
        ("scans/anim.gif", "GIF"),
    ):
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        grid_image(rng).save(root / relpath, fmt)
        add(relpath, None)
    for number, relpath in enumerate(("videos/walk.mp4", "videos/2024/sea.mp4")):
        write_video(root / relpath, seed + number)
        planted.videos.append(relpath)
    planted.broken = "2023/spring/broken.jpg"
    data = io.BytesIO()
    grid_image(rng).save(data, "JPEG")
    (root / planted.broken).write_bytes(data.getvalue()[: len(data.getvalue()) // 3])
    (root / "notes.txt").write_text("not a photo\n")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    planted.not_media = ["notes.txt"]
    return planted
