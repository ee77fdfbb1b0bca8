"""Video-caption data: loading a split once, frame sampling, pairs, batches and retrieval."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from model.config import DataConfig, PreprocessConfig, VideoConfig
from model.data.synth import SynthConfig, generate_corpus
from model.errors import ModelError
from model.hard_negatives import time_reversed
from model.preprocess import image_transform
from model.preprocess import normalise_pixels as normalise_frames
from model.tokenizer import tokenize
from runtime.video_decode import read_video
from training.training_data import EpochBatches, collate
from training.video_checks import opposite_motion, time_checks
from training.video_data import (
    CaptionedVideos,
    VideoPairDataset,
    embed_video_split,
    evaluate_videos,
    load_video_split,
    sample_frame_indices,
)

SIDE = 32  # frame side of the synthetic videos
FRAMES = 16  # frames per synthetic video
CONTEXT = 32
PRE = PreprocessConfig(image_size=SIDE)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video_data") / "corpus"
    config = SynthConfig(
        seed=1, n_images=0, n_videos=12, video_size=SIDE, video_frames=FRAMES, max_captions=3
    )
    generate_corpus(out, config, workers=1)
    return out


def video_config(corpus: Path) -> DataConfig:
    return DataConfig(train=corpus / "videos.csv", group_key="video_id")


@pytest.fixture(scope="module")
def train_split(corpus: Path) -> CaptionedVideos:
    return load_video_split(video_config(corpus), "train", CONTEXT, PRE, decode_frames=FRAMES)


def csv_rows(corpus: Path, split: str) -> dict[str, list[str]]:
    """video_id -> captions, in file order."""
    rows: dict[str, list[str]] = {}
    with (corpus / "videos.csv").open(newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            if row["split"] == split:
                rows.setdefault(row["video_id"], []).append(row["caption"])
    return rows


# --------------------------------------------------------------------------- loading


def test_load_video_split_shapes_dtypes_and_groups(
    corpus: Path, train_split: CaptionedVideos
) -> None:
    expected = csv_rows(corpus, "train")
    n = len(expected)
    assert [r.group_id for r in train_split.records] == list(expected)
    assert train_split.captions == list(expected.values())
    assert train_split.frames.shape == (n, FRAMES, 3, SIDE, SIDE)
    assert train_split.frames.dtype == torch.uint8
    assert train_split.groups.dtype == torch.long
    assert train_split.groups.tolist() == list(range(n))  # one video per video id
    assert train_split.noisy.dtype == torch.bool
    assert not train_split.noisy.any()
    for tokens, captions in zip(train_split.tokens, train_split.captions, strict=True):
        assert tokens.shape == (len(captions), CONTEXT)
    # Stored frames are the decoded pixels, untouched at the native size.
    first, _, _ = read_video(train_split.records[0].path, FRAMES)
    assert torch.equal(train_split.frames[0], torch.from_numpy(first).permute(0, 3, 1, 2))


def test_resized_frames_match_the_image_transform(corpus: Path) -> None:
    pre = PreprocessConfig(image_size=24, interpolation="bilinear")
    split = load_video_split(video_config(corpus), "val", CONTEXT, pre, decode_frames=4)
    assert split.frames.shape[1:] == (4, 3, 24, 24)
    decoded, _, _ = read_video(split.records[0].path, 4)
    expected = torch.stack([image_transform(pre)(Image.fromarray(f)) for f in decoded])
    torch.testing.assert_close(normalise_frames(split.frames[0], pre), expected)


def test_noise_swaps_captions_between_videos(corpus: Path, train_split: CaptionedVideos) -> None:
    noisy = load_video_split(
        video_config(corpus), "train", CONTEXT, PRE, decode_frames=2, noise_fraction=0.5, seed=3
    )
    n = len(noisy.records)
    assert int(noisy.noisy.sum()) == round(n * 0.5)
    for i in range(n):
        same = noisy.captions[i] == train_split.captions[i]
        assert same != bool(noisy.noisy[i])


def test_corrupt_and_missing_videos_are_skipped_and_counted(
    corpus: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    train = csv_rows(corpus, "train")
    full = load_video_split(video_config(copy), "train", CONTEXT, PRE, decode_frames=4)
    corrupt, missing = full.records[1].path, full.records[2].path
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    missing.unlink()
    with caplog.at_level(logging.INFO):
        split = load_video_split(video_config(copy), "train", CONTEXT, PRE, decode_frames=4)
    assert len(split.records) == len(train) - 2
    assert {r.path for r in split.records}.isdisjoint({corrupt, missing})
    assert split.frames.shape[0] == len(split.records) == len(split.tokens)
    kept = [i for i in range(len(full.records)) if i not in (1, 2)]
    assert torch.equal(split.frames, full.frames[kept])
    assert split.groups.tolist() == list(range(len(split.records)))
    summary = [r.getMessage() for r in caplog.records if r.name == "cots.train"]
    assert any("skipped 2 (corrupt video: 1, missing file: 1)" in m for m in summary), summary


def test_a_split_without_usable_videos_is_a_model_error(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no usable videos .* split 'nope'"):
        load_video_split(video_config(corpus), "nope", CONTEXT, PRE)
    with pytest.raises(ModelError, match="does not exist"):
        load_video_split(DataConfig(train=tmp_path / "none.csv"), "train", CONTEXT, PRE)
    with pytest.raises(ModelError, match="image_size is unset"):
        load_video_split(video_config(corpus), "train", CONTEXT, PreprocessConfig())


# --------------------------------------------------------------------------- frame sampling


def segments(available: int, num_frames: int) -> list[tuple[int, int]]:
    return [
        (i * available // num_frames, (i + 1) * available // num_frames) for i in range(num_frames)
    ]


@pytest.mark.parametrize(("available", "num_frames"), [(16, 8), (16, 16), (17, 5), (5, 4), (90, 7)])
def test_one_increasing_index_per_segment(available: int, num_frames: int) -> None:
    centre = sample_frame_indices(available, num_frames, None)
    assert centre.dtype == torch.long
    assert centre.shape == (num_frames,)
    bounds = segments(available, num_frames)
    assert centre.tolist() == [lo + (hi - lo) // 2 for lo, hi in bounds]
    assert torch.equal(centre, sample_frame_indices(available, num_frames, None))
    for seed in range(20):
        drawn = sample_frame_indices(available, num_frames, torch.Generator().manual_seed(seed))
        assert (drawn.diff() > 0).all()
        for (lo, hi), index in zip(bounds, drawn.tolist(), strict=True):
            assert lo <= index < hi


def test_random_offsets_depend_on_the_generator_seed() -> None:
    draws = {
        tuple(sample_frame_indices(64, 8, torch.Generator().manual_seed(seed)).tolist())
        for seed in range(5)
    }
    assert len(draws) == 5
    again = sample_frame_indices(64, 8, torch.Generator().manual_seed(2))
    assert torch.equal(again, sample_frame_indices(64, 8, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("generator", [None, torch.Generator().manual_seed(0)])
def test_short_videos_repeat_frames(generator: torch.Generator | None) -> None:
    indices = sample_frame_indices(4, 10, generator)
    assert indices.shape == (10,)
    assert (indices.diff() >= 0).all()
    assert set(indices.tolist()) <= {0, 1, 2, 3}
    assert sample_frame_indices(1, 6, generator).tolist() == [0] * 6
    if generator is None:
        assert indices.tolist() == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_bad_frame_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="available"):
        sample_frame_indices(0, 4, None)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(4, 0, None)


def test_normalise_frames_scales_then_normalises() -> None:
    frames = torch.full((2, 3, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalise_frames(frames, PRE)
    assert out.dtype == torch.float32
    assert out.shape == frames.shape
    for c in range(3):
        torch.testing.assert_close(
            out[:, :, c], torch.full((2, 3, 4, 4), (1.0 - PRE.mean[c]) / PRE.std[c])
        )


# --------------------------------------------------------------------------- pairs and batches


def test_video_pair_dataset_items(train_split: CaptionedVideos) -> None:
    dataset = VideoPairDataset(train_split, PRE, num_frames=8, train=False)
    assert len(dataset) == len(train_split.records)
    index = next(i for i, caps in enumerate(train_split.captions) if len(caps) > 1)
    video, tokens, group, noisy = dataset[index, 1]
    centre = sample_frame_indices(FRAMES, 8, None)
    assert video.shape == (8, 3, SIDE, SIDE)
    assert video.dtype == torch.float32
    assert torch.equal(video, normalise_frames(train_split.frames[index, centre], PRE))
    assert torch.equal(tokens, train_split.tokens[index][1])
    assert int(group) == int(train_split.groups[index])
    assert not bool(noisy)


def test_training_offsets_follow_the_global_rng(train_split: CaptionedVideos) -> None:
    dataset = VideoPairDataset(train_split, PRE, num_frames=4, train=True)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    first = [dataset[i, 0][0] for i in range(len(dataset))]
    torch.set_rng_state(state)  # what a resumed run restores from its checkpoint
    again = [dataset[i, 0][0] for i in range(len(dataset))]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    torch.manual_seed(12)
    other = [dataset[i, 0][0] for i in range(len(dataset))]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_reversed_clips_play_backwards_with_their_caption_turned_around(
    train_split: CaptionedVideos,
) -> None:
    keys = [(i, c) for i, caps in enumerate(train_split.captions) for c in range(len(caps))]
    turned = {key: time_reversed(train_split.captions[key[0]][key[1]]) for key in keys}
    assert any(t is not None for t in turned.values())  # the synthetic events change in time
    always = VideoPairDataset(train_split, PRE, num_frames=4, train=True, reverse_share=1.0)
    never = VideoPairDataset(train_split, PRE, num_frames=4, train=True)
    reversible = sum(t is not None for t in turned.values()) / len(turned)
    assert always.reversible_share == pytest.approx(reversible)
    assert never.reversible_share == 0.0
    for key in keys:
        torch.manual_seed(3)
        backwards_video, backwards_tokens, *_ = always[key]
        torch.manual_seed(3)
        video, tokens, *_ = never[key]
        text = turned[key]
        if text is None:  # a caption with no change in time reads the same both ways: kept
            assert torch.equal(backwards_video, video)
            assert torch.equal(backwards_tokens, tokens)
        else:
            assert torch.equal(backwards_video, video.flip(0))
            assert torch.equal(backwards_tokens, tokenize([text], CONTEXT)[0])
    # evaluation never reverses, and a share of 0 draws nothing from the generator
    evaluated = VideoPairDataset(train_split, PRE, num_frames=4, train=False, reverse_share=1.0)
    plain = VideoPairDataset(train_split, PRE, num_frames=4, train=False)
    assert all(torch.equal(evaluated[key][0], plain[key][0]) for key in keys)
    # (only the frame offsets come from the generator, as before reversed clips existed)
    torch.manual_seed(5)
    [never[key] for key in keys]
    after_items = torch.rand(())
    torch.manual_seed(5)
    [sample_frame_indices(FRAMES, 4, torch.default_generator) for _ in keys]
    assert torch.equal(torch.rand(()), after_items)


def test_reversed_clips_need_temporal_pooling() -> None:
    assert VideoConfig(reverse_share=0.5).pooling == "temporal"
    with pytest.raises(ValueError, match="reverse_share needs pooling=temporal"):
        VideoConfig(pooling="mean", reverse_share=0.5)
    assert VideoConfig(pooling="mean").reverse_share == 0.0


def test_reversed_clips_take_the_share_and_follow_the_global_rng(
    train_split: CaptionedVideos,
) -> None:
    keys = [
        (i, c)
        for i, caps in enumerate(train_split.captions)
        for c, caption in enumerate(caps)
        if time_reversed(caption) is not None
    ]
    half = VideoPairDataset(train_split, PRE, num_frames=4, train=True, reverse_share=0.5)
    torch.manual_seed(7)
    draws = [half[key][1] for key in keys * 20]
    flipped = sum(
        not torch.equal(t, train_split.tokens[k[0]][k[1]])
        for t, k in zip(draws, keys * 20, strict=True)
    )
    assert 0.3 < flipped / len(draws) < 0.7
    torch.manual_seed(7)
    again = [half[key][1] for key in keys * 20]
    assert all(torch.equal(a, b) for a, b in zip(draws, again, strict=True))


def test_size_mismatch_is_refused(train_split: CaptionedVideos) -> None:
    with pytest.raises(ModelError, match="decoded at 32px"):
        VideoPairDataset(train_split, PreprocessConfig(image_size=48), num_frames=4)


def test_collate_with_epoch_batches(train_split: CaptionedVideos) -> None:
    dataset = VideoPairDataset(train_split, PRE, num_frames=8)
    sampler = EpochBatches([len(t) for t in train_split.tokens], batch_size=4, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == len(train_split.records) // 4
    videos, tokens, groups, noisy = batches[0]
    assert videos.shape == (4, 8, 3, SIDE, SIDE)
    assert videos.dtype == torch.float32
    assert tokens.shape == (4, CONTEXT)
    assert groups.shape == (4,)
    assert noisy.dtype == torch.bool
    assert len({int(g) for b in batches for g in b[2]}) == len(batches) * 4  # no repeats


# --------------------------------------------------------------------------- retrieval


class MeanLinear(nn.Module):
    """Stand-in towers: mean colour of a video / mean token embedding, through a linear map."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.video = nn.Linear(3, dim)
        self.words = nn.EmbeddingBag(50_000, dim)

    def encode_image(self, videos: torch.Tensor) -> torch.Tensor:
        assert videos.dim() == 5
        return nn.functional.normalize(self.video(videos.mean(dim=(1, 3, 4))), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.words(tokens), dim=-1)


EXPECTED_KEYS = {
    f"{direction}_{metric}"
    for direction in ("t2v", "v2t")
    for metric in ("R@1", "R@5", "R@10", "medr")
} | {"mean_recall"}


def test_evaluate_videos_keys_and_mode(train_split: CaptionedVideos) -> None:
    towers = MeanLinear()
    towers.train()
    metrics = evaluate_videos(towers, train_split, PRE, CPU, num_frames=4)
    assert set(metrics) == EXPECTED_KEYS
    assert towers.training
    video_emb, text_emb, video_groups, text_groups = embed_video_split(
        towers, train_split, PRE, CPU, num_frames=4, batch_size=3
    )
    n_captions = sum(len(c) for c in train_split.captions)
    assert video_emb.shape == (len(train_split.records), 8)
    assert text_emb.shape == (n_captions, 8)
    assert torch.equal(video_groups, train_split.groups)
    assert text_groups.tolist() == [
        int(g)
        for g, caps in zip(train_split.groups, train_split.captions, strict=True)
        for _ in caps
    ]


class OneHot(nn.Module):
    """Video i (every pixel 10 * i) and captions starting with token i -> one-hot i."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def encode_image(self, videos: torch.Tensor) -> torch.Tensor:
        red = videos[:, :, 0].mean(dim=(1, 2, 3)) * PRE.std[0] + PRE.mean[0]  # undo normalise
        ids = (red * 255 / 10).round().long()
        return nn.functional.one_hot(ids, self.n).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(tokens[:, 0], self.n).float()


def test_perfect_recall_when_videos_and_captions_share_a_one_hot() -> None:
    n, n_frames = 12, 6
    frames = (torch.arange(n) * 10).to(torch.uint8).view(n, 1, 1, 1, 1)
    captions = [[f"v{i} caption {c}" for c in range(1 + i % 3)] for i in range(n)]
    split = CaptionedVideos(
        records=[None] * n,  # type: ignore[list-item]  # evaluation reads only their number
        captions=captions,
        tokens=[torch.full((len(caps), 4), i) for i, caps in enumerate(captions)],
        groups=torch.arange(n),
        noisy=torch.zeros(n, dtype=torch.bool),
        frames=frames.expand(n, n_frames, 3, 8, 8).clone(),
    )
    metrics = evaluate_videos(OneHot(n), split, PreprocessConfig(image_size=8), CPU, num_frames=4)
    assert set(metrics) == EXPECTED_KEYS
    for direction in ("t2v", "v2t"):
        assert metrics[f"{direction}_R@1"] == 100.0
        assert metrics[f"{direction}_medr"] == 1.0
    assert metrics["mean_recall"] == 100.0
    # The same towers with the captions handed to the wrong videos find nothing.
    split.tokens = split.tokens[1:] + split.tokens[:1]
    split.captions = split.captions[1:] + split.captions[:1]
    wrong = evaluate_videos(OneHot(n), split, PreprocessConfig(image_size=8), CPU, num_frames=4)
    assert wrong["t2v_R@1"] == 0.0
    assert wrong["v2t_R@1"] == 0.0


def test_frames_for_evaluation_are_the_segment_centres(train_split: CaptionedVideos) -> None:
    class Recorder(MeanLinear):
        seen: list[torch.Tensor]

        def encode_image(self, videos: torch.Tensor) -> torch.Tensor:
            self.seen.append(videos)
            return super().encode_image(videos)

    towers = Recorder()
    towers.seen = []
    embed_video_split(towers, train_split, PRE, CPU, num_frames=4, batch_size=100)
    centre = sample_frame_indices(FRAMES, 4, None)
    expected = normalise_frames(train_split.frames[:, centre], PRE)
    assert torch.equal(torch.cat(towers.seen), expected)
    assert np.array_equal(centre.numpy(), [2, 6, 10, 14])


def test_opposite_motion_turns_the_motion_phrase_around() -> None:
    assert opposite_motion("a red star moves from left to right") == (
        "a red star moves from right to left"
    )
    assert opposite_motion("a big circle rises upwards, next to a ring") == (
        "a big circle falls downwards, next to a ring"
    )
    assert opposite_motion("a blue heart grows") is None


class FirstMinusLast(nn.Module):
    """Stand-in towers: a video is (brightness of its first frame minus its last, 1); a text
    is (t, 1 - t), t a hash of its tokens in [0, 1). So a clip "prefers" forward time exactly
    when its first frame is brighter than its last (and t > 0), and a caption and its
    opposite-motion twin get different vectors."""

    def encode_image(self, videos: torch.Tensor) -> torch.Tensor:
        change = videos[:, 0].mean(dim=(1, 2, 3)) - videos[:, -1].mean(dim=(1, 2, 3))
        return torch.stack([change, torch.ones_like(change)], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(
            [sum(i * w for i, w in enumerate(row)) % 97 / 97 for row in tokens.tolist()]
        )
        return torch.stack([t, 1 - t], dim=1)


def test_time_checks_compare_each_clip_with_its_reverse_and_its_opposite_caption(
    train_split: CaptionedVideos,
) -> None:
    towers = FirstMinusLast()
    metrics = time_checks(towers, train_split, PRE, CPU, num_frames=4, context_length=CONTEXT)
    indices = sample_frame_indices(FRAMES, 4, None)
    clips = normalise_frames(train_split.frames[:, indices], PRE)
    change = clips[:, 0].mean(dim=(1, 2, 3)) - clips[:, -1].mean(dim=(1, 2, 3))
    first = [c[0] for c in train_split.captions]
    text = towers.encode_text(tokenize(first, CONTEXT))
    # forward score minus backward score = 2 * change * text[:, 0]
    expected = float(((change * text[:, 0]) > 0).float().mean()) * 100
    assert metrics["time_order_acc"] == pytest.approx(expected)
    moving = [i for i, c in enumerate(first) if opposite_motion(c) is not None]
    assert moving, "the fixture corpus has moving objects"
    turned = towers.encode_text(
        tokenize([opposite_motion(first[i]) or "" for i in moving], CONTEXT)
    )
    video = towers.encode_image(clips[moving])
    right = (video * text[moving]).sum(1) > (video * turned).sum(1)
    assert metrics["direction_acc"] == pytest.approx(float(right.float().mean()) * 100)
