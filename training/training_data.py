"""Image-caption pairs for training and evaluation, read through ``model.data`` readers.

Every epoch visits each image once with one of its captions. The order and caption choice
come from a generator seeded by (seed, epoch), so a run resumed at step s sees exactly the
batches an uninterrupted run would have seen from step s on.

Reading a split decodes every image once (corrupt files are reported up front). When a
preprocess config is given and the split fits ``data.cache_images_mb``, that pass keeps the
resized and cropped pixels as one uint8 tensor, so epochs and evaluations index memory
instead of decoding PNGs again; otherwise items are decoded when they are used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import Dataset

from model.config import DataConfig, HardNegativeConfig, PreprocessConfig
from model.data.readers import BadItemError, CsvImageReader, load_image
from model.data.records import CorpusError, ImageRecord, VideoRecord
from model.errors import ModelError
from model.hard_negatives import COLOURS, hard_negatives
from model.partial_captions import with_partial_captions
from model.preprocess import image_pixels, image_transform, normalise_pixels
from model.tokenizer import tokenize

logger = logging.getLogger("cots.train")


@dataclass
class CaptionedImages:
    """The usable images of one split, their tokenised captions and integer group ids."""

    records: list[ImageRecord]
    captions: list[list[str]]
    tokens: list[torch.Tensor]  # per image: [n_captions, L]
    groups: torch.Tensor  # [N] long; equal ids = same image id
    noisy: torch.Tensor  # [N] bool; True where captions were deliberately swapped
    pixels: torch.Tensor | None = None  # [N, 3, S, S] uint8 when decoded once into memory


def csv_reader(data: DataConfig, split: str | None) -> CsvImageReader:
    """The corpus reader the data config describes, for one split."""
    return CsvImageReader(
        data.train,
        img_key=data.img_key,
        caption_key=data.caption_key,
        group_key=data.group_key,
        split_key=data.split_key,
        separator=data.separator,
        split=split,
    )


def load_split(
    data: DataConfig,
    split: str | None,
    context_length: int,
    *,
    noise_fraction: float = 0.0,
    seed: int = 0,
    preprocess: PreprocessConfig | None = None,
    partial_captions: int = 0,
) -> CaptionedImages:
    """Read a split, decoding every image once so corrupt files are reported up front; with
    ``preprocess``, keep the decoded pixels when they fit the cache budget; with
    ``partial_captions`` n, each image also gets up to n of its captions cut after their first
    conjunct (model/partial_captions.py; for training splits only)."""
    cache = _PixelCache(preprocess, data.cache_images_mb)
    records: list[ImageRecord] = []
    try:
        reader = csv_reader(data, split)
        for sample in reader.samples():
            records.append(sample.record)
            cache.add(sample.image)
    except CorpusError as error:
        raise ModelError(str(error)) from None
    logger.info("%s", reader.report.summary())
    if not records:
        raise ModelError(f"no usable images in {data.train} for split {split!r}")
    captions, tokens, groups, noisy = caption_tensors(
        records,
        context_length,
        noise_fraction=noise_fraction,
        seed=seed,
        partial_captions=partial_captions,
    )
    return CaptionedImages(records, captions, tokens, groups, noisy, cache.tensor())


class _PixelCache:
    """Collects uint8 pixels while a split is read; gives up (and frees them) once the split
    outgrows ``budget_mb``, so a large corpus falls back to decoding per item."""

    def __init__(self, preprocess: PreprocessConfig | None, budget_mb: float) -> None:
        self.to_pixels = image_pixels(preprocess) if preprocess and budget_mb > 0 else None
        self.budget = budget_mb * 2**20
        self.items: list[torch.Tensor] = []
        self.bytes = 0

    def add(self, image: Image.Image) -> None:
        if self.to_pixels is None:
            return
        pixels = self.to_pixels(image)
        self.bytes += pixels.numel()
        if self.bytes > self.budget:
            logger.info("split exceeds data.cache_images_mb; images are decoded per use")
            self.to_pixels, self.items = None, []
            return
        self.items.append(pixels)

    def tensor(self) -> torch.Tensor | None:
        return torch.stack(self.items) if self.to_pixels is not None and self.items else None


def caption_tensors(
    records: Sequence[ImageRecord | VideoRecord],
    context_length: int,
    *,
    noise_fraction: float = 0.0,
    seed: int = 0,
    partial_captions: int = 0,
) -> tuple[list[list[str]], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(captions, tokens per item [n_captions, L], group ids [N], noisy [N]) of the records,
    with ``noise_fraction`` of the items given another item's captions and up to
    ``partial_captions`` partial captions added to each item's (after the swap, so a swapped
    item's partial captions are as wrong as its captions)."""
    captions = [list(r.captions) for r in records]
    group_index: dict[str, int] = {}
    groups = torch.tensor([group_index.setdefault(r.group_id, len(group_index)) for r in records])
    noisy = torch.zeros(len(records), dtype=torch.bool)
    if noise_fraction > 0:
        captions, noisy = _swap_captions(captions, noise_fraction, seed)
    if partial_captions:
        captions = [with_partial_captions(caps, partial_captions) for caps in captions]
        added = sum(len(c) for c in captions) - sum(len(r.captions) for r in records)
        logger.info("partial captions: %d added to %d items", added, len(captions))
    flat = [c for caps in captions for c in caps]
    all_tokens = tokenize(flat, context_length)
    tokens, start = [], 0
    for caps in captions:
        tokens.append(all_tokens[start : start + len(caps)])
        start += len(caps)
    return captions, tokens, groups, noisy


def _swap_captions(
    captions: list[list[str]], fraction: float, seed: int
) -> tuple[list[list[str]], torch.Tensor]:
    """Give a random ``fraction`` of images the captions of another image (a cyclic shift
    within the chosen set, so no image keeps its own)."""
    generator = torch.Generator().manual_seed(seed + 7919)
    n = len(captions)
    chosen = torch.randperm(n, generator=generator)[: round(n * fraction)].tolist()
    swapped = list(captions)
    for i, index in enumerate(chosen):
        swapped[index] = captions[chosen[(i + 1) % len(chosen)]]
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[chosen] = True
    return swapped, noisy


class CaptionNegatives:
    """Picks a training caption's hard negative (model/hard_negatives.py) from a uniform draw:
    a draw under ``fraction`` brings one, of a kind chosen uniformly among the kinds the
    caption has, then one of that kind; each caption's negatives are written once."""

    def __init__(self, config: HardNegativeConfig) -> None:
        self.kinds = tuple(config.kinds)
        self.fraction = config.fraction
        self._by_caption: dict[str, list[list[str]]] = {}

    def _grouped(self, caption: str) -> list[list[str]]:
        grouped = self._by_caption.get(caption)
        if grouped is None:
            by_kind: dict[str, list[str]] = {}
            for negative in hard_negatives(caption, self.kinds):
                by_kind.setdefault(negative.kind, []).append(negative.text)
            grouped = self._by_caption[caption] = list(by_kind.values())
        return grouped

    def every(self, caption: str) -> list[str]:
        """All of ``caption``'s negatives (written once, as :meth:`pick` uses them)."""
        return [text for options in self._grouped(caption) for text in options]

    def pick(self, caption: str, draw: float) -> str:
        """The negative for ``draw`` in [0, 1), or "" (none: the draw is above the fraction,
        or the caption has nothing to swap)."""
        if draw >= self.fraction:
            return ""
        grouped = self._grouped(caption)
        if not grouped:
            return ""
        spread = draw / self.fraction * len(grouped)
        kind = min(int(spread), len(grouped) - 1)
        options = grouped[kind]
        return options[min(int((spread - kind) * len(options)), len(options) - 1)]


class PairDataset(Dataset):
    """Indexable by (image index, caption index[, negative draw]) -> (image tensor, tokens,
    group, noisy[, hard negative caption or ""])."""

    def __init__(
        self,
        split: CaptionedImages,
        preprocess: PreprocessConfig,
        negatives: CaptionNegatives | None = None,
    ) -> None:
        self.split = split
        self.preprocess = preprocess
        self.transform = image_transform(preprocess)
        self.negatives = negatives

    def __len__(self) -> int:
        return len(self.split.records)

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, float]):
        index, caption = key[0], key[1]
        image = split_image(self.split, index, self.preprocess, self.transform)
        if image is None:
            return None
        item = (
            image,
            self.split.tokens[index][caption],
            self.split.groups[index],
            self.split.noisy[index],
        )
        if self.negatives is None:
            return item
        draw = key[2] if len(key) == 3 else 1.0
        return (*item, self.negatives.pick(self.split.captions[index][caption], draw))


def split_image(
    split: CaptionedImages,
    index: int,
    preprocess: PreprocessConfig,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The normalised image ``index`` of a split: from its pixel cache, else decoded now
    (None, logged, when the file changed on disk since the start-up scan)."""
    if split.pixels is not None:
        return normalise_pixels(split.pixels[index], preprocess)
    try:
        image = load_image(split.records[index])
    except BadItemError as error:
        logger.warning("skipped %s (%s)", split.records[index].uri, error)
        return None
    return (transform or image_transform(preprocess))(image)


def collate(items: list) -> tuple[torch.Tensor | list[str], ...]:
    """Stacks the tensor columns of a batch's items; a text column (hard negatives) stays a
    list. Items that could not be read (None) are left out."""
    items = [item for item in items if item is not None]
    return tuple(
        list(column) if isinstance(column[0], str) else torch.stack(column)
        for column in zip(*items, strict=True)
    )


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (image, caption) keys for one rank: a seeded permutation per epoch, cut into
    equal shards per rank and into full batches (the remainder is dropped). With
    ``negative_draws`` each key also carries a uniform draw that picks its hard negative.

    With ``similar`` (a key per item, e.g. :func:`colour_keys`) and ``similar_share`` s, the
    first s of each batch are items of one key (the shard's first part, sorted by key and cut
    into chunks whose order is shuffled), the rest as before: a query then meets images that
    agree with it on that key and must be told apart by the rest of what it says.

    With ``twins`` (per item, the items that are its hard negative images, e.g.
    training/negative_images.py) and ``twin_share`` t, up to t of each batch's places are
    given to a twin of one of the batch's first items (drawn per epoch), in place of the
    batch's last items, which this epoch then skips."""

    def __init__(
        self,
        n_captions: list[int],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        negative_draws: bool = False,
        similar: list[int] | None = None,
        similar_share: float = 0.0,
        twins: list[list[int]] | None = None,
        twin_share: float = 0.0,
    ) -> None:
        self.n_captions = n_captions
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.negative_draws = negative_draws
        self.similar = similar
        self.n_similar = round(similar_share * batch_size) if similar is not None else 0
        self.twins = twins
        self.n_twins = round(twin_share * batch_size) if twins is not None else 0
        self.epoch, self.start_batch = 0, 0
        if len(self) == 0:
            raise ModelError(
                f"{len(n_captions)} images cannot fill one batch of {batch_size} per process "
                f"on {world_size} process(es); lower batch_size"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return len(self.n_captions) // self.world_size // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]] | list[tuple[int, int, float]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.n_captions), generator=generator)
        picks = torch.rand(len(self.n_captions), generator=generator)
        # Drawn after the order and the caption picks, so those stay what they were without.
        draws = torch.rand(len(self.n_captions), generator=generator).tolist()
        shard = order[self.rank :: self.world_size][: len(self) * self.batch_size].tolist()
        if self.n_similar:
            shard = self._grouped(shard, generator)
        # Drawn last, so every draw above stays what it was without twins.
        twin_draws = (
            torch.rand(len(self.n_captions), generator=generator).tolist() if self.n_twins else []
        )
        for b in range(self.start_batch, len(self)):
            chunk = shard[b * self.batch_size : (b + 1) * self.batch_size]
            if self.n_twins:
                chunk = self._with_twins(chunk, twin_draws)
            if self.negative_draws:
                yield [(i, int(picks[i] * self.n_captions[i]), draws[i]) for i in chunk]
            else:
                yield [(i, int(picks[i] * self.n_captions[i])) for i in chunk]

    def _with_twins(self, chunk: list[int], draws: list[float]) -> list[int]:
        """``chunk`` with its last places given to twins of its first items (twins not already
        in the batch)."""
        assert self.twins is not None
        keep = len(chunk) - self.n_twins
        present = set(chunk)
        added: list[int] = []
        for i in chunk[:keep]:
            options = [j for j in self.twins[i] if j not in present]
            if options:
                twin = options[min(int(draws[i] * len(options)), len(options) - 1)]
                present.add(twin)
                added.append(twin)
                if len(added) == self.n_twins:
                    break
        return chunk[:keep] + added + chunk[keep : len(chunk) - len(added)]

    def _grouped(self, shard: list[int], generator: torch.Generator) -> list[int]:
        """The shard reordered so each batch opens with ``n_similar`` items of (mostly) one key;
        every item still comes once per epoch."""
        assert self.similar is not None
        n, size, batches = self.n_similar, self.batch_size, len(self)
        similar = shard[: n * batches]
        rest = shard[n * batches :]
        keys = self.similar
        similar.sort(key=lambda i: keys[i])  # stable: random order within a key
        chunks = [similar[b * n : (b + 1) * n] for b in range(batches)]
        chunk_order = torch.randperm(batches, generator=generator).tolist()
        grouped = []
        for b, c in enumerate(chunk_order):
            grouped += chunks[c] + rest[b * (size - n) : (b + 1) * (size - n)]
        return grouped


def colour_keys(captions: Sequence[Sequence[str]]) -> list[int]:
    """Per item: which colour word (model/hard_negatives.COLOURS) its first caption names
    first, or -1; the key of ``EpochBatches(similar=...)`` (words, not scene specs)."""
    index = {colour: i for i, colour in enumerate(COLOURS)}
    keys = []
    for item in captions:
        words = item[0].lower().replace(",", " ").split() if item else []
        keys.append(next((index[w] for w in words if w in index), -1))
    return keys
