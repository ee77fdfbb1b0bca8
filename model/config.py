"""The training configuration's schema, validated by pydantic: the towers, the objectives and
preprocessing read it. Reading one from a JSON file plus command-line overrides is
``training.recipes.load_train_config`` (the job's side).

Unknown keys fail loudly. The objective is chosen by an explicit field, never by model name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PreprocessConfig(_Strict):
    """How an image becomes a tensor; written into checkpoints and later into bundle.json."""

    image_size: int | None = Field(None, ge=8, description="default: the model's image size")
    resize_mode: Literal["shortest"] = "shortest"  # resize the shorter side, then centre crop
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


class FilterConfig(_Strict):
    """Adaptive momentum filter: drop pairs whose momentum similarity is unusually low."""

    enabled: bool = False
    alpha: float = Field(1.0, ge=0.0, description="threshold = mean - alpha * std")
    ema: float = Field(0.9, ge=0.0, lt=1.0, description="EMA factor of the threshold")
    warmup_steps: int = Field(100, ge=0, description="steps before the filter acts")
    max_drop: float = Field(
        0.5, ge=0.0, le=1.0, description="never drop more than this fraction of a batch"
    )


class MaskedModelingConfig(_Strict):
    """Masked language and vision modeling (token level); a weight of 0 turns a part off."""

    mlm_weight: float = Field(0.0, ge=0.0, description="weight of masked language modeling")
    mvm_weight: float = Field(0.0, ge=0.0, description="weight of masked vision modeling")
    text_mask_prob: float = Field(0.15, gt=0.0, lt=1.0, description="BERT masking probability")
    patch_mask_ratio: float = Field(0.4, gt=0.0, lt=1.0, description="block-masked patch share")
    # "tokenizer", the key's name before it said "visual", still loads (older configs and
    # checkpoints); a config is dumped with the new name
    visual_tokenizer: Path | None = Field(
        None,
        validation_alias=AliasChoices("visual_tokenizer", "tokenizer"),
        description="visual tokenizer file (cots train-visual-tokenizer); needed for MVM",
    )

    mlm_vocab: Literal["full", "corpus"] = Field(
        "full",
        description="predict a masked word among every id of the tokenizer (full: a 49,409-way "
        "output) or among the ids the training captions use (corpus: a few hundred, far cheaper)",
    )

    @property
    def enabled(self) -> bool:
        return self.mlm_weight > 0 or self.mvm_weight > 0


class IntraModalConfig(_Strict):
    """COOKIE's intra-modal contrastive losses: two views of an image, two dropout passes of
    a text (the shared head's dropout makes them differ)."""

    weight: float = Field(0.0, ge=0.0, description="weight of the two intra-modal losses")
    max_shift: int = Field(4, ge=0, description="pixels the second image view is shifted by")
    brightness: float = Field(0.1, ge=0.0, description="brightness jitter of the second view")


class TextAnchorConfig(_Strict):
    """Keep the text tower's embeddings of a caption corpus where they started (see
    model/text_anchor.py); a weight of 0 turns it off."""

    weight: float = Field(0.0, ge=0.0, description="weight of the mean cosine distance")
    captions: Path | None = Field(
        None, description="image-caption CSV whose train-split captions are the anchors"
    )
    batch_size: int = Field(128, ge=1, description="anchor captions sampled per step")


NegativeKind = Literal["colour", "shape", "size", "position", "relation", "binding", "motion"]
NEGATIVE_KINDS: tuple[NegativeKind, ...] = (
    "colour",
    "shape",
    "size",
    "position",
    "relation",
    "binding",
    "motion",
)


class HardNegativeConfig(_Strict):
    """NegCLIP-style hard negative captions (model/hard_negatives.py): a training caption also
    brings a copy of itself with one attribute or relation swapped, which every image scores
    as a negative in the image->text loss."""

    enabled: bool = False
    kinds: list[NegativeKind] = Field(
        list(NEGATIVE_KINDS), min_length=1, description="which swaps the negatives may make"
    )
    fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of a batch's captions that bring a negative (each costs one more "
        "caption through the text tower); 0: none, while the negatives still find the hard "
        "negative images of image_share",
    )
    image_share: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="share of each batch given to hard negative images: for as many of its "
        "items, another training image one of whose captions is, word for word in any order, "
        "one of the item's captions' hard negatives (a small purple circle beside a small "
        "purple square); both directions then meet them, at no extra cost a step",
    )
    similar_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of each batch filled with images whose captions name the same "
        "colour first (hard negative images for text->image: a query must tell them apart by "
        "shape, size and place); costs nothing, it only orders the epoch",
    )


class WordPredictionConfig(_Strict):
    """Caption-word prediction from the image's embedding (SuperClass: Huang et al.,
    "Classification done right for vision-language pre-training", NeurIPS 2024).

    A linear head on the normalised image embedding scores every word (token id) the training
    captions use; the target is the caption's own words, weighted by inverse document frequency
    and normalised, under a softmax cross-entropy. The image tower is then told, for every
    image, each word its caption says (a shape too), where the contrastive loss only asks it to
    beat the batch's other captions, most of which differ in colour or place already.
    """

    weight: float = Field(0.0, ge=0.0, description="weight of the loss (0: off)")
    text: bool = Field(
        False,
        description="the same head also names each caption's words from its text embedding, "
        "so both towers put a word in one direction of the shared space",
    )
    bigrams: bool = Field(
        False,
        description="the head also names the adjacent word pairs the training captions say "
        '("blue star"), so the target tells which attribute goes with which object',
    )


class ObjectiveConfig(_Strict):
    kind: Literal["cots", "clip"] = "cots"
    # 0.95, not ALBEF's 0.995: over a few hundred CPU steps from scratch a slower EMA leaves the
    # keys far behind the online towers (docs/results.md measures 0.99 against 0.95).
    momentum: float = Field(0.95, ge=0.0, lt=1.0, description="EMA factor of momentum towers")
    queue_size: int = Field(4096, ge=0, description="momentum keys kept per queue")
    temperature: float = Field(0.07, gt=0.0, description="initial softmax temperature")
    min_temperature: float = Field(0.01, gt=0.0)
    max_temperature: float = Field(0.5, gt=0.0)
    # 1.0 held training back badly in short runs from scratch; 0.1 keeps the task level on
    # (docs/results.md).
    kl_weight: float = Field(0.1, ge=0.0, description="weight of the task-level KL alignment")
    # Online in-batch keys: with momentum keys a from-scratch COTS learnt slowly (issue 16:
    # test mean recall 69.7 with them against 68.1 for in-batch momentum keys alone).
    batch_keys: Literal["momentum", "online"] = Field(
        "online",
        description="in-batch keys from the momentum towers (ALBEF/MoCo) or from the online "
        "towers, with gradient (as in CLIP); queue keys always come from the momentum towers",
    )
    # Schedules are fractions of the run (its objective steps: micro-batches), so one recipe
    # fits a 120-step bench row and a 372-step demo alike.
    # The defaults below are the recipe issue 16 measured (docs/results.md): the queue closed for
    # the first third, opening over the second; a momentum rising to 0.995; distillation.
    momentum_final: float | None = Field(
        0.995,
        ge=0.0,
        lt=1.0,
        description="momentum rises (cosine) from `momentum` to this over the first "
        "momentum_ramp of the run; None keeps it constant (BYOL's schedule: keys follow a young "
        "encoder closely and stay consistent once it settles)",
    )
    momentum_ramp: float = Field(1.0, ge=0.0, le=1.0, description="share of the run it rises")
    queue_warmup: float = Field(
        1 / 3,
        ge=0.0,
        le=1.0,
        description="share of the run with in-batch keys only (the queue still fills): keys of "
        "a young, fast-changing encoder are told apart by age rather than content",
    )
    queue_ramp: float = Field(
        1 / 3,
        ge=0.0,
        le=1.0,
        description="after the warm-up, the usable (newest) part of the queue grows linearly "
        "to queue_size over this share of the run",
    )
    distill_alpha: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="momentum distillation (ALBEF): targets = (1 - a) * hard positives + a * "
        "the momentum towers' softmax over the same keys, so near-duplicates are not hard "
        "negatives",
    )
    distill_warmup: float = Field(
        1 / 3, ge=0.0, le=1.0, description="distill_alpha rises linearly over this share of the run"
    )
    caption_positives: bool = Field(
        False,
        description="a key whose caption is identical (after tokenisation) to the query pair's "
        "caption is a positive too, not only keys of the same image id",
    )
    filter: FilterConfig = FilterConfig()
    masked: MaskedModelingConfig = MaskedModelingConfig()
    intra: IntraModalConfig = IntraModalConfig()
    text_anchor: TextAnchorConfig = TextAnchorConfig()
    hard_negatives: HardNegativeConfig = HardNegativeConfig()
    word_prediction: WordPredictionConfig = WordPredictionConfig()
    time_order_weight: float = Field(
        0.0,
        ge=0.0,
        description="video only: each caption must score its clip above the same clip played "
        "backwards (a hard negative that in-batch negatives almost never supply)",
    )

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if not self.min_temperature <= self.temperature <= self.max_temperature:
            raise ValueError("temperature must lie within [min_temperature, max_temperature]")
        if self.momentum_final is not None and self.momentum_final < self.momentum:
            raise ValueError("momentum_final must not be below momentum (the EMA only slows)")
        if self.text_anchor.weight > 0 and (self.kind != "clip" or not self.text_anchor.captions):
            raise ValueError("text_anchor needs the clip objective and text_anchor.captions")
        if self.masked.mvm_weight > 0 and self.masked.visual_tokenizer is None:
            raise ValueError(
                "masked.mvm_weight > 0 needs masked.visual_tokenizer (cots train-visual-tokenizer)"
            )
        return self


class CookieConfig(_Strict):
    """COOKIE's weight-sharing head: the same transformer blocks over both towers' tokens."""

    enabled: bool = False
    width: int | None = Field(None, ge=8, description="default: the text tower's width")
    layers: int = Field(1, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class VideoConfig(_Strict):
    """The video tower: frames through the image tower, then temporal pooling."""

    frames: int = Field(4, ge=1, description="frames sampled per video")
    decode_frames: int = Field(16, ge=1, description="frames decoded per video at load time")
    pooling: Literal["temporal", "mean"] = "temporal"
    layers: int = Field(2, ge=1, description="temporal transformer layers")
    heads: int = Field(4, ge=1)
    reverse_share: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of the training clips whose caption names a change in time that are "
        "played backwards, with the caption turned around to match (model/hard_negatives.py "
        "time_reversed: 'changes from blue to red' -> 'changes from red to blue'): each such "
        "clip shows its change both ways; 0: off",
    )

    @model_validator(mode="after")
    def _check(self) -> VideoConfig:
        if self.reverse_share > 0 and self.pooling == "mean":
            # a clip and its reverse pool to one vector, which both captions would then claim
            raise ValueError(
                "reverse_share needs pooling=temporal: mean pooling cannot tell a "
                "clip from its reverse"
            )
        return self


class DataConfig(_Strict):
    modality: Literal["image", "video"] = "image"
    train: Path = Path("data/synthetic/images.csv")
    train_split: str | None = "train"
    val_split: str | None = "val"
    eval_splits: list[str] = ["test", "heldout"]
    img_key: str = "filepath"
    caption_key: str = "caption"
    group_key: str | None = "image_id"
    split_key: str | None = "split"
    separator: str = ","
    noise_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="give this fraction of train images wrong captions"
    )
    partial_captions: int = Field(
        0,
        ge=0,
        description="per training image, up to this many captions cut after their first "
        "conjunct (model/partial_captions.py: 'a red star above a blue square, and ...' -> "
        "'a red star above a blue square') added to its captions, so a query that names part "
        "of a scene still finds it; 0: off",
    )
    workers: int = Field(0, ge=0, description="DataLoader worker processes")
    cache_images_mb: float = Field(
        4096,
        ge=0,
        description="keep a split's decoded, resized pixels in memory (uint8) when they take "
        "at most this many MiB, instead of decoding every image again each epoch; 0: never",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.partial_captions and self.modality != "image":
            raise ValueError("data.partial_captions applies to image corpora only (modality image)")
        return self


class TrainConfig(_Strict):
    # Patch 16 at 64 px, not 8: as accurate per step and about 40 % cheaper (docs/results.md).
    model: str = "cots-tiny-p16"
    pretrained: str | None = None
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataConfig = DataConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    cookie: CookieConfig = CookieConfig()
    video: VideoConfig = VideoConfig()
    image_stem: Literal["patch", "conv"] = Field(
        "patch",
        description="how the ViT image tower embeds its patches: 'patch', the model's own linear "
        "map per patch; 'conv', overlapping 3x3 convolutions down to the same token grid, which "
        "see shape within a patch (model/conv_stem.py)",
    )
    init_from: Path | None = Field(
        None, description="a COTS checkpoint whose towers start this run (e.g. video from image)"
    )
    freeze: list[Literal["image", "text"]] = Field(
        [],
        description="towers whose weights stay as they start (e.g. the image tower while a "
        "video model learns its temporal pooling from an image run's towers)",
    )
    learn_new_words: Path | None = Field(
        None,
        description="with 'text' frozen: a caption CSV (e.g. the image run's) whose train-split "
        "words keep their embeddings; the token embeddings of words it never uses still learn, "
        "so text made of its words embeds exactly as before while new words gain a meaning",
    )
    output: Path = Path("runs/cots-tiny-p16")
    seed: int = 0
    # 16 epochs of cots-tiny-p16 fit the demo's 8-minute budget on two cores (issue 16); the
    # demo's recipe (conv stem, hard negatives) takes about 11 (issue 40, docs/results.md).
    epochs: int = Field(16, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps")
    batch_size: int = Field(128, ge=2, description="per process, per micro-batch")
    accum_steps: int = Field(1, ge=1, description="micro-batches per optimiser step")
    lr: float = Field(1e-3, gt=0.0)
    pretrained_lr_scale: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="learning-rate factor of the towers' own weights when they start from "
        "--pretrained (e.g. 0.1 to fine-tune gently); new parts (heads, temperature, video "
        "pooling) learn at lr",
    )
    weight_decay: float = Field(0.1, ge=0.0)
    warmup_steps: int = Field(50, ge=0)
    # 1.0: the unclipped default COTS run's gradient norm jumped from ~10 to 137 right after the
    # learning-rate peak, and its loss from 3.9 to 8.7 (issue 16).
    grad_clip: float | None = Field(
        1.0, gt=0.0, description="clip the gradient's global norm to this (None: no clipping)"
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    device: str = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    log_every: int = Field(10, ge=1)
    eval_every_epoch: bool = True
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.data.modality == "video" and self.objective.masked.mvm_weight > 0:
            raise ValueError("masked vision modeling is for images; set mvm_weight 0 for video")
        if self.objective.intra.weight > 0 and not self.cookie.enabled:
            raise ValueError(
                "objective.intra needs cookie.enabled: without the head's dropout the two text "
                "passes are identical"
            )
        if self.freeze and self.objective.kind == "cots":
            raise ValueError("freeze is for the CLIP objective (momentum towers would drift)")
        if self.learn_new_words is not None and "text" not in self.freeze:
            raise ValueError("learn_new_words needs 'text' in freeze")
        if self.video.frames > self.video.decode_frames:
            raise ValueError("video.frames must not exceed video.decode_frames")
        return self
