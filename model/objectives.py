"""The training objectives: COTS (instance + task level, with the noise filter) and CLIP.

One training step, top to bottom (B pairs, D embedding dim, Q queue size):
  online towers  -> image i [B, D], text t [B, D]                 (normalised, with grad)
  momentum EMA   -> momentum towers <- m * momentum + (1 - m) * online
  momentum keys  -> i_m [B, D], t_m [B, D]                        (normalised, no grad)
  filter         -> keep [B]: pairs whose i_m . t_m is not unusually low
  instance level -> InfoNCE of i against [t_m ; text queue] and of t against [i_m ; image queue],
                    positives = same image id, over the kept rows (batch_keys="online" uses the
                    online t, i as in-batch keys instead, with gradient, as CLIP does)
  task level     -> symmetric KL between the rows of the two [B, Q] distributions over the
                    queues: both are over the same aligned columns (queue slot j is one pair)
  enqueue        -> kept (i_m, t_m, id) of every rank, at the shared pointer
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.aux_inputs import AuxInputs
from model.config import ObjectiveConfig
from model.distributed import DistInfo, all_gather_cat, all_gather_keeping_grad
from model.errors import ModelError
from model.factory import Towers
from model.losses import (
    caption_ids,
    clip_loss,
    distilled_targets,
    effective_rank,
    masked_logits,
    mean_pairwise_cosine,
    multi_positive_targets,
    positive_mask,
    soft_cross_entropy,
    symmetric_kl,
    with_negatives,
)
from model.masking import IGNORE_INDEX
from model.momentum import FeatureQueues, ema_update
from model.noise_filter import AdaptiveMomentumFilter
from model.schedules import linear_ramp, momentum_at
from model.text_anchor import TextAnchor
from model.token_heads import MlmHead, MvmHead
from model.visual_tokenizer import VisualTokenizer
from model.word_head import WordHead, word_loss

# Length groups of a training batch's captions in the text tower (Towers.text_tower): four
# halved the text tower's step cost on the synthetic corpus (docs/results.md).
TEXT_BUCKETS = 4


@dataclass
class Features:
    image: torch.Tensor  # [B, D] projected global image (or video) feature, not normalised
    image_tokens: torch.Tensor  # [B, P, W_v] patch tokens ([B, T, D] frame features for video)
    text: torch.Tensor  # [B, D]
    text_tokens: torch.Tensor  # [B, L, W_t]
    temperature: torch.Tensor  # scalar
    # auxiliary outputs, present when the matching AuxInputs were given
    mlm_logits: torch.Tensor | None = None  # [N masked tokens, V]
    mlm_targets: torch.Tensor | None = None  # [N] the mlm_logits column of each masked word
    mvm_logits: torch.Tensor | None = None  # [N masked patches, K]
    image_view2: torch.Tensor | None = None  # [B, D] second view of the images
    text_view2: torch.Tensor | None = None  # [B, D] second dropout pass of the texts
    video_reversed: torch.Tensor | None = None  # [B, D] each clip played backwards
    negative_text: torch.Tensor | None = None  # [N, D] hard negative captions (aux rows)
    word_logits: torch.Tensor | None = None  # [B, V] each image's caption-word scores
    word_targets: torch.Tensor | None = None  # [B, V] its caption's IDF-weighted words
    text_word_logits: torch.Tensor | None = None  # [B, V] the same head on the captions


class OnlineModel(nn.Module):
    """The trained parameters: the towers, the temperature and the masked-modeling heads (what
    DDP wraps, so every pass that needs gradients runs inside ``forward``)."""

    def __init__(
        self,
        towers: Towers,
        config: ObjectiveConfig,
        codebook_size: int | None = None,
        mlm_vocab: torch.Tensor | None = None,
        word_vocab: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``mlm_vocab``: sorted token ids the MLM head predicts among (``masked.mlm_vocab``
        corpus: the training captions' ids, aux_inputs.mlm_corpus_vocab); None: all of them.
        ``word_vocab``: the word-prediction head's ids and their IDF weights
        (word_head.word_vocabulary of the training captions), needed when it is on."""
        super().__init__()
        self.towers = towers
        self.temperature = nn.Parameter(torch.tensor(config.temperature))
        self.min_temperature, self.max_temperature = config.min_temperature, config.max_temperature
        masked = config.masked
        self.mlm = (
            MlmHead(
                towers.text_width,
                towers.embed_dim,
                int(towers.text.token_embedding.num_embeddings),  # type: ignore[union-attr,arg-type]
                mlm_vocab,
            )
            if masked.mlm_weight > 0
            else None
        )
        if masked.mvm_weight > 0 and codebook_size is None:
            raise ModelError("masked vision modeling needs the visual tokenizer's codebook size")
        self.mvm = (
            MvmHead(towers.image_width, towers.embed_dim, codebook_size)
            if masked.mvm_weight > 0 and codebook_size
            else None
        )
        self.words: WordHead | None = None
        self.words_from_text = config.word_prediction.text
        if config.word_prediction.weight > 0:
            if word_vocab is None:
                raise ModelError("word prediction needs the training captions' vocabulary")
            self.words = WordHead(towers.embed_dim, *word_vocab)

    @property
    def mlm_vocab(self) -> torch.Tensor | None:
        """The MLM head's corpus vocabulary (masking draws its random words from it), or None."""
        return self.mlm.vocab if self.mlm is not None else None

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor, aux: AuxInputs | None = None
    ) -> Features:
        with torch.no_grad():
            self.temperature.clamp_(self.min_temperature, self.max_temperature)
        image, image_tokens = self.towers.image_features(images)
        text_pooled, text_tokens = self.towers.text_tower(tokens, TEXT_BUCKETS)
        text = self.towers.add_text_head(text_pooled, text_tokens, tokens)
        features = Features(image, image_tokens, text, text_tokens, self.temperature)
        if self.words is not None:
            features.word_logits = self.words(image)
            features.word_targets = self.words.targets(tokens)
            if self.words_from_text:
                features.text_word_logits = self.words(text)
        if aux is not None:
            self._auxiliary(features, images, tokens, text_pooled, aux)
        return features

    def _auxiliary(
        self,
        features: Features,
        images: torch.Tensor,
        tokens: torch.Tensor,
        text_pooled: torch.Tensor,
        aux: AuxInputs,
    ) -> None:
        if self.mlm is not None and aux.masked_tokens is not None and aux.mlm_labels is not None:
            # The corpus head's pass over the masked captions is cut into length groups as the
            # main pass is (about half the tower's cost; masked positions lie before each end of
            # text). The full head keeps the one full-length pass: grouping moves its results
            # by rounding, and its runs must match earlier ones bit for bit.
            buckets = TEXT_BUCKETS if self.mlm.vocab is not None else 1
            _, states = self.towers.text_tower(aux.masked_tokens, buckets)
            chosen = aux.mlm_labels != IGNORE_INDEX
            rows = chosen.nonzero()[:, 0]
            # The heads see the normalised global feature, the one retrieval uses: fed the raw
            # projection, they grew a component shared by all items, and after normalisation
            # every embedding looked alike (the contrastive loss collapsed in 50 steps).
            features.mlm_logits = self.mlm(
                states[chosen],
                F.normalize(features.image, dim=-1)[rows],
                self.towers.text.token_embedding.weight,  # type: ignore[union-attr]
            )
            features.mlm_targets = self.mlm.targets(aux.mlm_labels[chosen])
        if self.mvm is not None and aux.patch_mask is not None:
            patch_states = self.towers.masked_patch_tokens(
                images, aux.patch_mask, self.mvm.mask_embedding
            )
            rows = aux.patch_mask.nonzero()[:, 0]
            text_global = F.normalize(features.text, dim=-1)[rows]
            features.mvm_logits = self.mvm(patch_states[aux.patch_mask], text_global)
        if aux.negative_tokens is not None:
            pooled, states = self.towers.text_tower(aux.negative_tokens, TEXT_BUCKETS)
            features.negative_text = self.towers.add_text_head(pooled, states, aux.negative_tokens)
        if aux.time_order and self.towers.temporal is not None:
            # frame features do not depend on order: only the pooling sees the reversal
            features.video_reversed = self.towers.temporal(features.image_tokens.flip(1))
        if aux.second_view is not None:
            features.image_view2 = self.towers.image_features(aux.second_view)[0]
            # The tower itself has no dropout: a second dropout pass is a second pass of the
            # head over the same tower output, not a second run of the tower.
            features.text_view2 = self.towers.add_text_head(
                text_pooled, features.text_tokens, tokens
            )


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (values * keep).sum() / keep.sum().clamp(min=1)


class AuxiliaryLosses(nn.Module):
    """The token-level (MLM, MVM), caption-word prediction and COOKIE intra-modal losses, added
    to either objective.

    Pairs the noise filter dropped (``keep`` 0) are left out of MLM, MVM and word prediction:
    a wrong caption would teach the heads to predict words from an unrelated image. The intra-modal
    losses see one modality at a time, so a mismatched pair does not hurt them.
    """

    def __init__(self, config: ObjectiveConfig, visual_tokenizer: VisualTokenizer | None) -> None:
        super().__init__()
        self.config = config
        # named "tokenizer" still: the attribute names the frozen codebook's keys in the
        # objective's state dict, which checkpoints hold
        self.tokenizer = visual_tokenizer.requires_grad_(False).eval() if visual_tokenizer else None

    def train(self, mode: bool = True) -> AuxiliaryLosses:
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # frozen: its codebook must not move
        return self

    def forward(
        self,
        features: Features,
        aux: AuxInputs | None,
        images: torch.Tensor,
        groups: torch.Tensor,
        keep: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        total = features.image.new_zeros(())
        parts: dict[str, float] = {}
        if features.word_logits is not None and features.word_targets is not None:
            loss, accuracy = word_loss(features.word_logits, features.word_targets, keep)
            total = total + self.config.word_prediction.weight * loss
            parts.update(loss_words=float(loss.detach()), word_accuracy=accuracy)
            if features.text_word_logits is not None:
                loss, accuracy = word_loss(features.text_word_logits, features.word_targets, keep)
                total = total + self.config.word_prediction.weight * loss
                parts.update(loss_words_text=float(loss.detach()), text_word_accuracy=accuracy)
        if aux is None:
            return total, parts
        masked = self.config.masked
        if features.mlm_logits is not None and aux.mlm_labels is not None:
            chosen = aux.mlm_labels != IGNORE_INDEX
            targets = features.mlm_targets
            loss, accuracy = _token_loss(
                features.mlm_logits,
                aux.mlm_labels[chosen] if targets is None else targets,
                keep[chosen.nonzero()[:, 0]],
            )
            total = total + masked.mlm_weight * loss
            parts.update(loss_mlm=float(loss.detach()), mlm_accuracy=accuracy)
        if features.mvm_logits is not None and aux.patch_mask is not None:
            if self.tokenizer is None:
                raise ModelError("masked vision modeling needs the visual tokenizer")
            with torch.no_grad():
                targets = self.tokenizer.encode(images)[aux.patch_mask]
            loss, accuracy = _token_loss(
                features.mvm_logits, targets, keep[aux.patch_mask.nonzero()[:, 0]]
            )
            total = total + masked.mvm_weight * loss
            parts.update(loss_mvm=float(loss.detach()), mvm_accuracy=accuracy)
        if features.video_reversed is not None:
            loss, accuracy = _time_order_loss(features, keep)
            total = total + self.config.time_order_weight * loss
            parts.update(loss_time_order=float(loss.detach()), time_order_accuracy=accuracy)
        if features.image_view2 is not None and features.text_view2 is not None:
            temperature = features.temperature
            loss_ii = _intra_loss(features.image, features.image_view2, groups, temperature)
            loss_tt = _intra_loss(features.text, features.text_view2, groups, temperature)
            total = total + self.config.intra.weight * (loss_ii + loss_tt) / 2
            parts.update(loss_i2i=float(loss_ii.detach()), loss_t2t=float(loss_tt.detach()))
        return total, parts


def _token_loss(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Cross-entropy over the kept rows' predictions, and their accuracy."""
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    correct = (logits.argmax(dim=-1) == targets).float()
    return _masked_mean(losses, keep), float(_masked_mean(correct, keep).detach())


def _time_order_loss(features: Features, keep: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Two-way choice per caption between its clip and the reversed clip."""
    assert features.video_reversed is not None
    text = F.normalize(features.text.float(), dim=-1)
    forward = (text * F.normalize(features.image.float(), dim=-1)).sum(-1)
    backward = (text * F.normalize(features.video_reversed.float(), dim=-1)).sum(-1)
    logits = torch.stack([forward, backward], dim=1) / features.temperature
    losses = F.cross_entropy(
        logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), reduction="none"
    )
    return _masked_mean(losses, keep), float(_masked_mean((forward > backward).float(), keep))


def _intra_loss(
    view1: torch.Tensor, view2: torch.Tensor, groups: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    a, b = F.normalize(view1.float(), dim=-1), F.normalize(view2.float(), dim=-1)
    one_way, other_way = clip_loss(a, b, groups, temperature)
    return (one_way.mean() + other_way.mean()) / 2


def _hard_negative_logits(
    image: torch.Tensor,
    features: Features,
    aux: AuxInputs | None,
    captions: torch.Tensor,
    report: bool = True,
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """([B, N] logits of every image against the batch's hard negative captions, or None;
    with ``report``, how often a caption outscores its own negative: two host syncs). A
    negative that is exactly a row's own caption (another caption's swap can be) is no
    negative of that row: -inf there."""
    if (
        features.negative_text is None
        or aux is None
        or aux.negative_tokens is None
        or aux.negative_rows is None
    ):
        return None, {}
    negatives = F.normalize(features.negative_text.float(), dim=-1)
    logits = image @ negatives.t() / features.temperature
    own_caption = captions[:, None] == caption_ids(aux.negative_tokens)[None, :]
    logits = logits.masked_fill(own_caption, float("-inf"))
    if not report:
        return logits, {}
    with torch.no_grad():
        rows = aux.negative_rows
        text = F.normalize(features.text.float(), dim=-1)
        positive = (image[rows] * text[rows]).sum(-1)
        negative = (image[rows] * negatives).sum(-1)
        accuracy = float((positive > negative).float().mean())
    return logits, {"hard_negative_accuracy": accuracy, "hard_negatives": float(len(rows))}


class ClipObjective(nn.Module):
    """The baseline: plain in-batch InfoNCE, no momentum, no queue, no filter (auxiliary
    losses still apply when configured, e.g. for COOKIE on top of the baseline)."""

    def __init__(
        self,
        online: OnlineModel,
        config: ObjectiveConfig,
        dist: DistInfo,
        visual_tokenizer: VisualTokenizer | None = None,
        anchor_tokens: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.dist = dist
        self.auxiliary = AuxiliaryLosses(config, visual_tokenizer)
        anchor = config.text_anchor
        self.anchor_weight = anchor.weight
        self.anchor = (
            TextAnchor(online.towers, anchor_tokens, anchor.batch_size)
            if anchor.weight > 0 and anchor_tokens is not None
            else None
        )

    def forward(
        self,
        features: Features,
        groups: torch.Tensor,
        online: OnlineModel,
        images: torch.Tensor,
        aux: AuxInputs | None = None,
        tokens: torch.Tensor | None = None,
        **_: torch.Tensor | None,
    ) -> LossOutput:
        image = F.normalize(features.image.float(), dim=-1)
        text = F.normalize(features.text.float(), dim=-1)
        # Under DDP every rank's pairs are negatives, as in open_clip's ClipLoss; each rank
        # scores its own rows against the global batch (the ablation's baseline sees as many
        # negatives as the COTS objective's in-batch keys do).
        batch = (
            all_gather_keeping_grad(image, self.dist),
            all_gather_keeping_grad(text, self.dist),
            all_gather_cat(groups, self.dist),
        )
        negative_logits, negative_parts = (
            _hard_negative_logits(image, features, aux, caption_ids(tokens))
            if tokens is not None
            else (None, {})
        )
        i2t, t2i = clip_loss(image, text, groups, features.temperature, batch, negative_logits)
        contrastive = (i2t.mean() + t2i.mean()) / 2
        keep = torch.ones(len(groups), device=groups.device)
        extra, extra_parts = self.auxiliary(features, aux, images, groups, keep)
        if self.anchor is not None:
            anchored = self.anchor(online.towers, TEXT_BUCKETS)
            extra = extra + self.anchor_weight * anchored
            extra_parts["loss_text_anchor"] = float(anchored.detach())
        loss = contrastive + extra
        return LossOutput(
            loss,
            {
                "loss": float(loss.detach()),
                "loss_i2t": float(i2t.mean().detach()),
                "loss_t2i": float(t2i.mean().detach()),
                "temperature": float(features.temperature.detach()),
                **negative_parts,
                **extra_parts,
            },
        )


class CotsObjective(nn.Module):
    """Momentum contrastive learning with aligned queues, KL alignment and the noise filter."""

    steps: torch.Tensor

    def __init__(
        self,
        online: OnlineModel,
        config: ObjectiveConfig,
        dist: DistInfo,
        visual_tokenizer: VisualTokenizer | None = None,
        total_steps: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.auxiliary = AuxiliaryLosses(config, visual_tokenizer)
        self.dist = dist
        # The run's length in objective steps, which the schedules' fractions are of.
        self.total_steps = total_steps
        self.momentum_towers = copy.deepcopy(online.towers).requires_grad_(False)
        self.queues = FeatureQueues(config.queue_size, online.towers.embed_dim)
        f = config.filter
        self.filter = AdaptiveMomentumFilter(
            f.alpha, f.ema, f.warmup_steps, enabled=f.enabled, max_drop=f.max_drop
        )
        # The schedules' clock, checkpointed with the queues.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Whether forward reports its diagnostics (the spread's two SVDs, the softmax's mass on
        # the queue, the filter's statistics: about twenty host syncs). The training loop turns
        # them on only for the steps it logs; the loss never depends on them.
        self.diagnostics = True

    def _steps(self, fraction: float) -> int:
        return round(fraction * self.total_steps)

    def momentum(self) -> float:
        c = self.config
        ramp = self._steps(c.momentum_ramp)
        return momentum_at(int(self.steps), c.momentum, c.momentum_final, ramp)

    def queue_mask(self) -> torch.Tensor:
        """[Q] bool: the queue slots that serve as keys at this step (none in the warm-up,
        then the newest ones, more each step of the ramp)."""
        c = self.config
        opened = linear_ramp(
            int(self.steps), self._steps(c.queue_warmup), self._steps(c.queue_ramp)
        )
        if opened <= 0.0:
            return torch.zeros(self.queues.size, dtype=torch.bool, device=self.steps.device)
        if opened >= 1.0:
            return self.queues.valid_mask()
        return self.queues.newest_mask(round(opened * self.queues.size))

    @torch.no_grad()
    def momentum_keys(
        self, online: OnlineModel, images: torch.Tensor, tokens: torch.Tensor, momentum: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ema_update(online.towers, self.momentum_towers, momentum)
        self.momentum_towers.eval()
        image_m = F.normalize(self.momentum_towers.image_features(images)[0].float(), dim=-1)
        text_m = self.momentum_towers.text_features(tokens, TEXT_BUCKETS)[0]
        text_m = F.normalize(text_m.float(), dim=-1)
        return image_m, text_m

    def forward(
        self,
        features: Features,
        groups: torch.Tensor,
        online: OnlineModel,
        images: torch.Tensor,
        tokens: torch.Tensor,
        noisy: torch.Tensor | None = None,
        aux: AuxInputs | None = None,
    ) -> LossOutput:
        config = self.config
        image = F.normalize(features.image.float(), dim=-1)
        text = F.normalize(features.text.float(), dim=-1)
        momentum = self.momentum()
        image_m, text_m = self.momentum_keys(online, images, tokens, momentum)
        captions = caption_ids(tokens)

        # Filter on the momentum similarity of each pair; statistics over all ranks' pairs so
        # every rank keeps the same threshold.
        pair_sim = (image_m * text_m).sum(dim=-1)
        self.filter.update(all_gather_cat(pair_sim, self.dist))
        keep = self.filter.keep_mask(pair_sim).float()

        queue_valid = self.queue_mask()
        batch_valid = torch.ones(len(groups), dtype=torch.bool, device=groups.device)
        key_valid = torch.cat([batch_valid, queue_valid])
        key_groups = torch.cat([groups, self.queues.groups])
        key_captions = torch.cat([captions, self.queues.captions])
        text_batch, image_batch = (
            (text, image) if config.batch_keys == "online" else (text_m, image_m)
        )
        # Copies: the enqueue below writes the buffers in place. (Buffers carry no gradient.)
        queue_text, queue_image = self.queues.text.clone(), self.queues.image.clone()
        text_keys = torch.cat([text_batch, queue_text])
        image_keys = torch.cat([image_batch, queue_image])

        # [B, B + Q]: column j is the same pair for both directions.
        logits_i2t = masked_logits(image, text_keys, features.temperature, key_valid)
        logits_t2i = masked_logits(text, image_keys, features.temperature, key_valid)
        query_captions = captions if config.caption_positives else None
        targets = multi_positive_targets(
            groups, key_groups, key_valid, query_captions, key_captions
        )
        targets_i2t = targets_t2i = targets
        alpha = config.distill_alpha * linear_ramp(
            int(self.steps), 0, self._steps(config.distill_warmup)
        )
        if alpha > 0:
            # The momentum towers' own retrieval distributions over the same keys.
            with torch.no_grad():
                temperature = features.temperature.detach()
                text_keys_m = torch.cat([text_m, queue_text])
                image_keys_m = torch.cat([image_m, queue_image])
                teacher_i2t = masked_logits(image_m, text_keys_m, temperature, key_valid)
                teacher_t2i = masked_logits(text_m, image_keys_m, temperature, key_valid)
                targets_i2t = distilled_targets(targets, teacher_i2t, alpha)
                targets_t2i = distilled_targets(targets, teacher_t2i, alpha)
        negative_logits, negative_parts = _hard_negative_logits(
            image, features, aux, captions, report=self.diagnostics
        )
        loss_i2t = _masked_mean(
            soft_cross_entropy(*with_negatives(logits_i2t, targets_i2t, negative_logits)), keep
        )
        loss_t2i = _masked_mean(soft_cross_entropy(logits_t2i, targets_t2i), keep)
        # Task level over the queue columns only: aligned slot by slot, and free of the in-batch
        # positive that would dominate both distributions.
        batch = len(groups)
        if bool(queue_valid.any()):
            loss_kl = _masked_mean(symmetric_kl(logits_i2t[:, batch:], logits_t2i[:, batch:]), keep)
        else:
            loss_kl = logits_i2t.new_zeros(())
        extra, extra_parts = self.auxiliary(features, aux, images, groups, keep)
        loss = (loss_i2t + loss_t2i) / 2 + config.kl_weight * loss_kl + extra

        kept = keep.bool()
        self.queues.enqueue(
            self._gather_kept(image_m, kept),
            self._gather_kept(text_m, kept),
            self._gather_kept(groups, kept),
            self._gather_kept(captions, kept),
        )
        self.steps += 1
        if not self.diagnostics:
            return LossOutput(loss, {"loss": float(loss.detach())})
        parts = {
            "loss": float(loss.detach()),
            "loss_i2t": float(loss_i2t.detach()),
            "loss_t2i": float(loss_t2i.detach()),
            "loss_kl": float(loss_kl.detach()),
            "temperature": float(features.temperature.detach()),
            "momentum": momentum,
            "distill_alpha": alpha,
            "filtered_frac": 1.0 - float(keep.mean()),
            "filter_threshold": float(self.filter.threshold),
            "momentum_pair_sim": float(pair_sim.mean()),
            "queue_filled": int(self.queues.filled),
            "queue_used": int(queue_valid.sum()),
            **_key_diagnostics(logits_i2t, groups, captions, key_groups, key_captions, key_valid),
            **_spread(image, text),
            **negative_parts,
            **extra_parts,
        }
        if noisy is not None and bool(noisy.any()):
            dropped = ~kept
            parts["filter_recall"] = float((dropped & noisy).sum() / noisy.sum())
            if bool(dropped.any()):
                parts["filter_precision"] = float((dropped & noisy).sum() / dropped.sum())
        return LossOutput(loss, parts)

    def _gather_kept(self, values: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """Kept rows of every rank. Ranks keep different counts, so gather padded rows and
        the mask, then select."""
        if not self.dist.enabled:
            return values[kept]
        all_values = all_gather_cat(values, self.dist)
        all_kept = all_gather_cat(kept, self.dist)
        return all_values[all_kept]


@torch.no_grad()
def _key_diagnostics(
    logits: torch.Tensor,
    groups: torch.Tensor,
    captions: torch.Tensor,
    key_groups: torch.Tensor,
    key_captions: torch.Tensor,
    key_valid: torch.Tensor,
) -> dict[str, float]:
    """Where the image->text softmax puts its mass, and how many queue negatives are captions
    identical to the query's own (false negatives unless caption_positives is on)."""
    batch = len(groups)
    probs = F.softmax(logits.float(), dim=1)
    parts = {"queue_mass": float(probs[:, batch:].sum(dim=1).mean())}
    queue_valid = key_valid[batch:]
    if bool(queue_valid.any()):
        same_image = positive_mask(groups, key_groups[batch:], queue_valid)
        same_caption = captions[:, None] == key_captions[None, batch:]
        negatives = queue_valid.sum() - same_image.sum(dim=1)
        duplicates = (same_caption & queue_valid[None, :] & ~same_image).sum(dim=1)
        parts["queue_duplicate_negatives"] = float((duplicates / negatives.clamp(min=1)).mean())
    return parts


@torch.no_grad()
def _spread(image: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """How far apart the batch's embeddings are: mean pairwise cosine and effective rank."""
    return {
        "image_mean_cos": mean_pairwise_cosine(image),
        "text_mean_cos": mean_pairwise_cosine(text),
        "image_erank": effective_rank(image),
        "text_erank": effective_rank(text),
    }


def report_diagnostics(objective: nn.Module, on: bool) -> None:
    """Whether ``objective``'s next forward computes its diagnostics (the COTS objective's;
    the baseline reports only its losses, which cost nothing more)."""
    if isinstance(objective, CotsObjective):
        objective.diagnostics = on


def build_objective(
    online: OnlineModel,
    config: ObjectiveConfig,
    dist: DistInfo,
    visual_tokenizer: VisualTokenizer | None = None,
    total_steps: int = 0,
    anchor_tokens: torch.Tensor | None = None,
) -> nn.Module:
    """The configured objective; ``total_steps`` (objective steps of the run) scales the COTS
    schedules; ``anchor_tokens`` are the text anchor's captions (CLIP only)."""
    if config.kind == "clip":
        return ClipObjective(online, config, dist, visual_tokenizer, anchor_tokens)
    return CotsObjective(online, config, dist, visual_tokenizer, total_steps)
