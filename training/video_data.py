"""Video-caption pairs for training and evaluation, the video twin of ``training.training_data``.

Every video is decoded once at load time into a fixed stock of frames, kept as uint8 at the
model's input size; each training step then samples its frames from that stock, one per equal
segment, so a clip is never decoded twice. The sampler, the collate function and the
(video index, caption index) keys are those of ``training.training_data``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from tqdm import tqdm

from model.config import DataConfig, PreprocessConfig
from model.data.readers import BadItemError, VideoCsvReader
from model.data.records import CorpusError, VideoRecord
from model.errors import ModelError
from model.hard_negatives import time_reversed
from model.preprocess import _INTERPOLATION, normalise_pixels
from model.tokenizer import tokenize
from runtime.video_decode import segment_centres
from training.evaluate import embed_captions, retrieval_metrics
from training.training_data import CaptionNegatives, caption_tensors

logger = logging.getLogger("cots.train")


class VideoTextEncoder(Protocol):
    """What evaluation needs of the towers: ``encode_image`` takes videos [B, T, 3, S, S]."""

    training: bool

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def train(self, mode: bool = True) -> object: ...


@dataclass
class CaptionedVideos:
    """The usable videos of one split, their decoded frames, tokenised captions and group ids."""

    records: list[VideoRecord]
    captions: list[list[str]]
    tokens: list[torch.Tensor]  # per video: [n_captions, L]
    groups: torch.Tensor  # [N] long; equal ids = same video id
    noisy: torch.Tensor  # [N] bool; True where captions were deliberately swapped
    frames: torch.Tensor  # [N, F, 3, S, S] uint8, not normalised


def load_video_split(
    data: DataConfig,
    split: str | None,
    context_length: int,
    preprocess: PreprocessConfig,
    *,
    decode_frames: int = 16,
    noise_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> CaptionedVideos:
    """Read a split, decoding ``decode_frames`` uniformly spaced frames of every video once
    (with a progress bar unless ``progress`` is False).

    Frames get the image transform's geometry (shorter side to ``preprocess.image_size``,
    centre crop) but stay uint8; :func:`model.preprocess.normalise_pixels` finishes them per
    batch. Corrupt and missing videos are skipped and counted in the logged report.
    """
    size = preprocess.image_size
    if size is None:
        raise ModelError("preprocess.image_size is unset; resolve it from the model first")
    if decode_frames < 1:
        raise ModelError(f"decode_frames must be at least 1, got {decode_frames}")
    try:
        reader = video_csv_reader(data, split, decode_frames)
        # One listing pass, then decoding by hand rather than through reader.samples(), which
        # would list (and warn about missing files) a second time. Knowing the count up front
        # sizes the progress bar and lets the frames go straight into one buffer instead of a
        # list that is stacked at the end (twice the memory at the peak).
        listed = list(reader.records())
    except CorpusError as error:
        raise ModelError(str(error)) from None
    frames = torch.empty((len(listed), decode_frames, 3, size, size), dtype=torch.uint8)
    resize = transforms.Compose(
        [
            transforms.Resize(size, interpolation=_INTERPOLATION[preprocess.interpolation]),
            transforms.CenterCrop(size),
        ]
    )
    records: list[VideoRecord] = []
    bar = tqdm(
        listed,
        desc=f"decoding {split or 'all'} videos",
        unit="video",
        leave=False,
        disable=not progress,
    )
    for record in bar:
        try:
            sample = reader.decode(record)
        except BadItemError as error:
            reader.report.skip(record.uri, error.reason, error.detail)
            continue
        reader.report.keep()
        frames[len(records)] = _fit_frames(sample.frames, size, resize)
        records.append(record)
    logger.info("%s", reader.report.summary())
    if not records:
        raise ModelError(
            f"no usable videos in {data.train} for split {split!r} ({reader.report.summary()})"
        )
    if len(records) < len(listed):
        frames = frames[: len(records)].clone()  # a view would pin the skipped rows' memory
    captions, tokens, groups, noisy = caption_tensors(
        records, context_length, noise_fraction=noise_fraction, seed=seed
    )
    return CaptionedVideos(records, captions, tokens, groups, noisy, frames)


def video_csv_reader(data: DataConfig, split: str | None, num_frames: int) -> VideoCsvReader:
    """The video corpus reader the data config describes, for one split."""
    return VideoCsvReader(
        data.train,
        video_key=data.img_key,
        caption_key=data.caption_key,
        group_key=data.group_key,
        split_key=data.split_key,
        separator=data.separator,
        split=split,
        num_frames=num_frames,
    )


def _fit_frames(frames: np.ndarray, size: int, resize: transforms.Compose) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> [T, 3, size, size] uint8, through PIL as the image transform does."""
    if frames.shape[1:3] != (size, size):
        frames = np.stack([np.asarray(resize(Image.fromarray(frame))) for frame in frames])
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


def sample_frame_indices(
    available: int, num_frames: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``num_frames`` non-decreasing frame indices [num_frames] out of ``available``.

    The frames are cut into ``num_frames`` equal segments and one index is taken per segment:
    at a random offset drawn from ``generator`` (training), at the segment centre without one
    (evaluation). With at least as many frames as wanted the indices strictly increase; with
    fewer, frames repeat.
    """
    if available < 1 or num_frames < 1:
        raise ValueError(f"need available >= 1 and num_frames >= 1, got {available}, {num_frames}")
    if generator is None:
        # The one definition of the centres, shared with the torch-free indexer.
        return torch.from_numpy(segment_centres(available, num_frames))
    if available >= num_frames:
        # Integer segment bounds, so every segment holds at least one frame and no two
        # segments share one: the indices are strictly increasing.
        bounds = torch.arange(num_frames + 1) * available // num_frames
        lengths = bounds[1:] - bounds[:-1]
        offsets = (torch.rand(num_frames, generator=generator) * lengths).long()
        # float32 rounding can turn rand * length into length itself for draws just below 1.
        return bounds[:-1] + torch.minimum(offsets, lengths - 1)
    # Segments are shorter than a frame: each output lands on the frame its segment overlaps.
    positions = torch.arange(num_frames) + torch.rand(num_frames, generator=generator).double()
    indices = (positions * available / num_frames).long()
    return indices.clamp(max=available - 1)


def _check_size(split: CaptionedVideos, preprocess: PreprocessConfig) -> None:
    stored = split.frames.shape[-1]
    if preprocess.image_size is not None and preprocess.image_size != stored:
        raise ModelError(
            f"videos were decoded at {stored}px but preprocess.image_size is "
            f"{preprocess.image_size}; load the split again with this preprocess config"
        )


class VideoPairDataset(Dataset):
    """Indexable by (video index, caption index[, negative draw]) -> (video [T, 3, S, S], tokens,
    group, noisy[, hard negative caption or ""]).

    In training the frame offsets come from torch's global generator, which the training loop
    checkpoints, so a resumed run (0 workers) samples the frames an uninterrupted one would.
    With ``reverse_share`` > 0, a training clip whose caption names a change in time is played
    backwards with that share, drawn from the same generator, and its caption (and so its hard
    negative) is the caption turned around (``time_reversed``).
    """

    def __init__(
        self,
        split: CaptionedVideos,
        preprocess: PreprocessConfig,
        num_frames: int,
        train: bool = True,
        negatives: CaptionNegatives | None = None,
        reverse_share: float = 0.0,
    ) -> None:
        if num_frames < 1:
            raise ModelError(f"num_frames must be at least 1, got {num_frames}")
        _check_size(split, preprocess)
        self.split = split
        self.preprocess = preprocess
        self.num_frames = num_frames
        self.train = train
        self.negatives = negatives
        self.centre = sample_frame_indices(split.frames.shape[1], num_frames, None)
        self.reverse_share = reverse_share if train else 0.0
        # per video, per caption: the caption of the clip played backwards and its tokens, or
        # None where the caption names no change in time
        self.reversed: list[list[tuple[str, torch.Tensor] | None]] = (
            [_reversed_captions(captions, split.tokens[0].shape[-1]) for captions in split.captions]
            if self.reverse_share > 0
            else []
        )

    def __len__(self) -> int:
        return len(self.split.records)

    @property
    def reversible_share(self) -> float:
        """The share of the training captions that can be turned around in time (0 when
        reversal is off): only their clips are ever played backwards."""
        turned = [text for captions in self.reversed for text in captions]
        return sum(text is not None for text in turned) / len(turned) if turned else 0.0

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, float]) -> tuple:
        index, caption = key[0], key[1]
        if self.train:
            indices = sample_frame_indices(
                self.split.frames.shape[1], self.num_frames, torch.default_generator
            )
        else:
            indices = self.centre
        text, tokens = self.split.captions[index][caption], self.split.tokens[index][caption]
        backwards = self.reversed[index][caption] if self.reversed else None
        if backwards is not None and float(torch.rand(())) < self.reverse_share:
            indices = indices.flip(0)
            text, tokens = backwards
        item = (
            normalise_pixels(self.split.frames[index, indices], self.preprocess),
            tokens,
            self.split.groups[index],
            self.split.noisy[index],
        )
        if self.negatives is None:
            return item
        draw = key[2] if len(key) == 3 else 1.0
        return (*item, self.negatives.pick(text, draw))


def _reversed_captions(
    captions: list[str], context_length: int
) -> list[tuple[str, torch.Tensor] | None]:
    """Each caption of one video turned around in time, with its tokens, or None."""
    turned = [time_reversed(caption) for caption in captions]
    present = [text for text in turned if text is not None]
    tokens = iter(tokenize(present, context_length)) if present else iter(())
    return [None if text is None else (text, next(tokens)) for text in turned]


@torch.no_grad()
def embed_video_split(
    towers: VideoTextEncoder,
    split: CaptionedVideos,
    preprocess: PreprocessConfig,
    device: torch.device,
    num_frames: int,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(video_emb [N, D], text_emb [M, D], video_groups [N], text_groups [M]), centre frames."""
    _check_size(split, preprocess)
    indices = sample_frame_indices(split.frames.shape[1], num_frames, None)
    was_training = towers.training
    towers.train(False)
    try:
        video_emb = []
        for start in range(0, len(split.records), batch_size):
            # Normalise on the device: uint8 is a quarter of the float bytes to move.
            videos = split.frames[start : start + batch_size, indices].to(device)
            video_emb.append(
                towers.encode_image(normalise_pixels(videos, preprocess)).float().cpu()
            )
        text_emb, text_groups = embed_captions(
            towers, split.tokens, split.groups, device, batch_size
        )
    finally:
        towers.train(was_training)
    return torch.cat(video_emb), text_emb, split.groups, text_groups


def evaluate_videos(
    towers: VideoTextEncoder,
    split: CaptionedVideos,
    preprocess: PreprocessConfig,
    device: torch.device,
    num_frames: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """Retrieval metrics both ways: "t2v_R@1", ..., "v2t_medr", "mean_recall"."""
    video_emb, text_emb, video_groups, text_groups = embed_video_split(
        towers, split, preprocess, device, num_frames, batch_size
    )
    return retrieval_metrics(
        video_emb, text_emb, video_groups, text_groups, directions=("t2v", "v2t")
    )
