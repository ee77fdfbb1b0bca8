"""Builds the two towers from any open_clip model config, ours included.

Our small CPU configs live in ``model/configs/*.json`` in open_clip's format and are registered
with open_clip, so ``ViT-B-32`` and ``cots-tiny`` are built by the same code path.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transformer import text_global_pool
from torch import nn

from model.clip_tokens import VOCAB_SIZE
from model.config import TrainConfig
from model.conv_stem import add_conv_stem
from model.cookie import SharedHead, text_valid_mask
from model.errors import ModelError
from model.video import TemporalPooling

CONFIG_DIR = Path(__file__).parent / "configs"
logger = logging.getLogger("cots.model")


@cache
def _register_configs() -> None:
    open_clip.add_model_config(CONFIG_DIR)


def list_models() -> list[str]:
    _register_configs()
    return list(open_clip.list_models())


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config of ``name``; unknown names fail with the list of known ones."""
    _register_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelError(
            f"unknown model config {name!r}; ours: {', '.join(ours)}; "
            "any open_clip name also works (see open_clip.list_models())"
        )
    return config


CLIP_VOCAB = VOCAB_SIZE  # open_clip's BPE
MASK_TOKEN_ID = CLIP_VOCAB  # one row past the BPE vocabulary, never produced by the tokenizer


class Towers(nn.Module):
    """An image tower and a text tower with no cross-attention, projecting into one space.

    ``image_features``/``text_features`` return the projected global feature (not normalised)
    and the token features (patch tokens [B, P, W_v]; text token states [B, L, W_t]) that the
    token-level objectives use. ``encode_image``/``encode_text`` return one L2-normalised
    tensor each, which is what retrieval and the ONNX export need.

    Options: ``head`` (COOKIE's weight-sharing head, added to both global features) and
    ``temporal`` (pooling of frame features): with it, 5-D input [B, T, 3, S, S] is a batch of
    videos whose frames go through the image tower.
    """

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        embed_dim: int,
        head: SharedHead | None = None,
        temporal: TemporalPooling | None = None,
    ) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        self.head = head
        self.temporal = temporal
        # Towers report tokens alongside the pooled feature.
        self.visual.output_tokens = True  # type: ignore[assignment]
        self.text.output_tokens = True  # type: ignore[assignment]

    @property
    def image_width(self) -> int:
        """The width of the image tower's patch tokens (ViT towers only)."""
        transformer: Any = getattr(self.visual, "transformer", None)
        if transformer is None:
            raise ModelError(
                f"{type(self.visual).__name__} image towers have no patch tokens; COOKIE and "
                "masked vision modeling need a ViT image tower"
            )
        return int(transformer.width)

    @property
    def text_width(self) -> int:
        transformer: Any = self.text.transformer
        return int(transformer.width)

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, S, S] -> (global [B, D], patch tokens [B, P, W_v]); videos
        [B, T, 3, S, S] -> (global [B, D], frame features [B, T, D])."""
        if images.ndim == 5:
            return self._video_features(images)
        output = self.visual(images)
        if isinstance(output, tuple):
            pooled, tokens = output
        else:
            # A ResNet tower (RN50) pools with attention and returns no tokens: [B, 0, D].
            pooled, tokens = output, output.new_zeros(output.shape[0], 0, output.shape[1])
        if self.head is not None:
            pooled = pooled + self.head(tokens, "image")
        return pooled, tokens

    def _video_features(self, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.temporal is None:
            raise ModelError("these towers have no temporal pooling: they cannot embed videos")
        b, t = videos.shape[:2]
        frames, _ = self.image_features(videos.flatten(0, 1))
        frames = frames.view(b, t, -1)
        return self.temporal(frames), frames

    def text_features(
        self, tokens: torch.Tensor, buckets: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, L] -> (global [B, D], token states [B, L, W_t])."""
        pooled, states = self.text_tower(tokens, buckets)
        return self.add_text_head(pooled, states, tokens), states

    def text_tower(
        self, tokens: torch.Tensor, buckets: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower alone: (pooled [B, D], token states [B, L, W_t]) for any length
        L up to the context length, not only the full one.

        With ``buckets`` > 1 (training), the batch is sorted by caption length and cut into
        that many groups, each trimmed to its own longest caption: a batch of captions with a
        median of 19 tokens and a maximum of 45 then costs about half. Token states past a
        group's length are zeros; every reader of the states masks everything after a row's
        end-of-text token anyway. The cut depends on the data, so export never asks for it.

        open_clip's ``TextTransformer.forward`` applies its causal mask at full context length,
        so it fails on shorter input. Trimmed batches are what make short queries cheap: the
        tower pools at the end-of-text token, and a causal tower's state there never sees the
        padding after it, so trimming padding changes nothing but the cost. This is open_clip's
        forward with the mask cut to the input; towers it does not cover (a class token, or
        pooling at the last position) run open_clip's own forward at full length.
        """
        text: Any = self.text
        if not self.trims_padding:
            return text(tokens)
        x, attn_mask = text._embeds(tokens)
        # Groups share a plain causal mask; a per-caption padding mask (3-D) runs whole.
        causal_only = attn_mask is not None and attn_mask.ndim == 2
        if causal_only and buckets > 1 and tokens.shape[0] >= 2 * buckets:
            return self._text_tower_by_length(tokens, x, attn_mask, buckets)
        return self._text_tower_embedded(tokens, x, attn_mask)

    def _text_tower_embedded(
        self, tokens: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower after its embedding: ``x`` [B, L, W_t] embeds ``tokens`` [B, L]."""
        text: Any = self.text
        if attn_mask is not None and attn_mask.ndim == 2:
            attn_mask = attn_mask[: tokens.shape[1], : tokens.shape[1]]
        x = text.ln_final(text.transformer(x, attn_mask=attn_mask))
        pooled = text_global_pool(
            x, tokens, pool_type=text.pool_type, eos_token_id=getattr(text, "eos_id", None)
        )
        projection = text.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)
        elif projection is not None:
            pooled = pooled @ projection
        return pooled, x

    def _text_tower_by_length(
        self, tokens: torch.Tensor, x: torch.Tensor, attn_mask: torch.Tensor, buckets: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The whole batch is embedded once (``x``), then cut: a lookup per group would make the
        # backward pass write one dense vocabulary-sized gradient per group (49k x 128 floats
        # zeroed and summed each time, ~7 % of a training step at four groups).
        lengths = (tokens != 0).sum(dim=1)  # padding (id 0) only ever follows end-of-text
        order = lengths.argsort()
        pooled, states = [], []
        for rows in order.chunk(buckets):
            width = max(1, int(lengths[rows].max()))
            p, s = self._text_tower_embedded(tokens[rows, :width], x[rows, :width], attn_mask)
            pooled.append(p)
            states.append(nn.functional.pad(s, (0, 0, 0, tokens.shape[1] - width)))
        inverse = order.argsort()
        return torch.cat(pooled)[inverse], torch.cat(states)[inverse]

    @property
    def trims_padding(self) -> bool:
        """Whether cutting the padding off a batch leaves the text embeddings unchanged, so
        that :meth:`text_tower` (and the exported text model) accepts shorter batches.

        Only a causal tower that pools at the end-of-text token qualifies: its state there has
        never seen the padding. A bidirectional tower (SigLIP's ``no_causal_mask``) attends to
        the padding, a class token (CoCa) is appended after it, and ``last``/``first`` pooling
        reads a position that moves when the padding goes; those run at full length.
        """
        text: Any = self.text
        return (
            getattr(text, "attn_mask", None) is not None
            and getattr(text, "cls_emb", None) is None
            and getattr(text, "pool_type", None) in ("argmax", "eos")
        )

    def add_text_head(
        self, pooled: torch.Tensor, states: torch.Tensor, tokens: torch.Tensor
    ) -> torch.Tensor:
        """The text tower's own global feature plus the COOKIE head's, when there is a head.
        Each call is one dropout pass of the head over the same tower output."""
        if self.head is None:
            return pooled
        return pooled + self.head(states, "text", text_valid_mask(tokens))

    def masked_patch_tokens(
        self, images: torch.Tensor, patch_mask: torch.Tensor, mask_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Patch tokens [B, P, W_v] of images whose masked patches (``patch_mask`` [B, P]) are
        replaced by ``mask_embedding`` [W_v] right after the patch embedding."""
        conv = getattr(self.visual, "conv1", None)
        # A Conv2d (linear patch embedding) or a conv stem; both return [B, W, grid, grid].
        if not isinstance(conv, nn.Conv2d | nn.Sequential):
            raise ModelError("masked vision modeling needs a ViT image tower (patch conv1)")

        def replace(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            flat = output.flatten(2).transpose(1, 2)  # [B, P, W]
            flat = torch.where(patch_mask[..., None], mask_embedding.to(flat.dtype), flat)
            return flat.transpose(1, 2).reshape(output.shape)

        handle = conv.register_forward_hook(replace)
        try:
            _, tokens = self.visual(images)
        finally:
            handle.remove()
        return tokens

    @property
    def patch_grid(self) -> tuple[int, int]:
        grid = getattr(self.visual, "grid_size", None)
        if grid is None:
            raise ModelError("the image tower has no patch grid (not a ViT)")
        return int(grid[0]), int(grid[1])

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised [B, D] of images [B, 3, S, S] or videos [B, T, 3, S, S]."""
        return nn.functional.normalize(self.image_features(images)[0], dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_features(tokens)[0], dim=-1)


def ensure_mask_token(towers: Towers) -> int:
    """The [MASK] id; grows the token embedding by one row when the vocabulary has no spare
    id (pretrained open_clip models). Our configs ship the spare row already."""
    embedding = towers.text.token_embedding
    if not isinstance(embedding, nn.Embedding):
        raise ModelError("masked language modeling needs an open_clip text tower")
    if embedding.num_embeddings <= MASK_TOKEN_ID:
        grown = nn.Embedding(MASK_TOKEN_ID + 1, embedding.embedding_dim)
        with torch.no_grad():
            grown.weight[: embedding.num_embeddings] = embedding.weight
            grown.weight[embedding.num_embeddings :].normal_(std=0.02)
        towers.text.token_embedding = grown
        towers.text.vocab_size = MASK_TOKEN_ID + 1  # type: ignore[assignment]
    return MASK_TOKEN_ID


def create_towers(name: str, pretrained: str | None = None) -> Towers:
    """Build the towers of open_clip model ``name``.

    ``pretrained`` is an open_clip pretrained tag (needs the weights in open_clip's cache or a
    reachable hub) or a local checkpoint file, loaded with ``weights_only=True``. A full
    open_clip CLIP checkpoint works: its text weights are converted to the separate text tower.
    """
    return towers_of(load_open_clip(name, pretrained), name)


def towers_of(clip: nn.Module, name: str) -> Towers:
    """The two towers of a built open_clip model."""
    config = model_config(name)
    return Towers(clip.visual, clip.text, embed_dim=int(config["embed_dim"]))  # type: ignore[arg-type]


def load_open_clip(name: str, pretrained: str | None = None) -> nn.Module:
    """open_clip's model ``name`` with its weights (see :func:`create_towers`)."""
    config = model_config(name)
    if "hf_model_name" in config.get("text_cfg", {}):
        raise ModelError(
            f"{name} has a Hugging Face text tower ({config['text_cfg']['hf_model_name']}), "
            "which needs the transformers package and that model's files from a model hub; "
            "COTS Search supports open_clip's own text towers (CLIP's, SigLIP's)"
        )
    if pretrained and not Path(pretrained).is_file():
        known = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in known:
            raise ModelError(
                f"--pretrained {pretrained!r} is neither a file nor an open_clip tag for {name} "
                f"(tags: {', '.join(known) or 'none'})"
            )
    try:
        clip: nn.Module = open_clip.create_model(
            name, pretrained=pretrained or None, force_custom_text=True, weights_only=True
        )
    except Exception as error:
        if pretrained and not Path(pretrained).is_file():
            # A tag: open_clip downloads (or finds in its cache) the weights first, and a
            # failed download surfaces as a RuntimeError like a bad file does.
            raise ModelError(
                f"could not fetch open_clip weights {name}/{pretrained}: {error}. Without a "
                "network, pass a local checkpoint file instead."
            ) from error
        if isinstance(error, RuntimeError):
            raise ModelError(f"cannot load weights {pretrained!r} into {name}: {error}") from error
        raise
    return clip


def build_towers(config: TrainConfig, *, pretrained: bool = True) -> Towers:
    """The towers a training config describes: base model, COOKIE head, video pooling and the
    [MASK] row. Export and evaluation rebuild a checkpoint's towers with this."""
    towers = create_towers(config.model, config.pretrained if pretrained else None)
    if config.image_stem == "conv":
        add_conv_stem(towers.visual)
    if config.cookie.enabled:
        c = config.cookie
        towers.head = SharedHead(
            towers.image_width,
            towers.text_width,
            c.width or towers.text_width,
            towers.embed_dim,
            layers=c.layers,
            heads=c.heads,
            dropout=c.dropout,
        )
    if config.data.modality == "video":
        v = config.video
        towers.temporal = TemporalPooling(
            towers.embed_dim, v.frames, v.pooling, layers=v.layers, heads=v.heads
        )
    if config.objective.masked.mlm_weight > 0:
        ensure_mask_token(towers)
    return towers
