"""The COTS objective against hand computations: a hand-filled queue, the KL term over the
queue columns alone (its value, its zero and its gradient), the filter keeping dropped pairs out
of the losses and the queue, its threshold and its warm-up, caption-level positives, momentum
distillation and the schedules at their endpoints. The queues themselves: test_cots_queues.py."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model.config import FilterConfig, ObjectiveConfig
from model.distributed import DistInfo
from model.factory import Towers, create_towers
from model.losses import (
    caption_ids,
    distilled_targets,
    effective_rank,
    mean_pairwise_cosine,
    multi_positive_targets,
)
from model.momentum import FeatureQueues
from model.objectives import CotsObjective, Features, OnlineModel
from model.schedules import linear_ramp, momentum_at

BATCH, QUEUE, DIM = 4, 6, 64  # cots-micro's embedding is 64 wide


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 49000, (BATCH, 48), generator=generator)
    tokens[:, 10] = 49407
    return images, tokens


def _objective(
    total_steps: int = 10, dist: DistInfo | None = None, **options: object
) -> tuple[OnlineModel, CotsObjective]:
    torch.manual_seed(0)
    # momentum 0 (unless asked): the momentum towers are an exact copy, so keys equal the
    # online features
    # The plain form of the objective (MoCo/ALBEF keys, no schedules, no distillation), which
    # the hand computations below spell out; each test turns on what it checks.
    plain = {
        "kind": "cots",
        "queue_size": QUEUE,
        "momentum": 0.0,
        "momentum_final": None,
        "batch_keys": "momentum",
        "queue_warmup": 0.0,
        "queue_ramp": 0.0,
        "distill_alpha": 0.0,
        "distill_warmup": 0.0,
    }
    config = ObjectiveConfig.model_validate({**plain, **options})
    online = OnlineModel(create_towers("cots-micro"), config)
    return online, CotsObjective(online, config, dist or DistInfo(), total_steps=total_steps)


def _fill_queue(
    queues: FeatureQueues, groups: list[int], captions: list[int] | None = None
) -> None:
    generator = torch.Generator().manual_seed(1)
    queues.image.copy_(F.normalize(torch.randn(QUEUE, DIM, generator=generator), dim=-1))
    queues.text.copy_(F.normalize(torch.randn(QUEUE, DIM, generator=generator), dim=-1))
    queues.groups.copy_(torch.tensor(groups))
    if captions is not None:
        queues.captions.copy_(torch.tensor(captions))
    queues.filled.fill_(QUEUE)
    queues.ptr.zero_()


def _features(online: OnlineModel, images: torch.Tensor, tokens: torch.Tensor):
    features = online(images, tokens)
    image = F.normalize(features.image.float(), dim=-1)
    text = F.normalize(features.text.float(), dim=-1)
    return features, image, text


def test_losses_over_a_hand_filled_queue_equal_a_hand_computation() -> None:
    online, cots = _objective(kl_weight=0.5)
    images, tokens = _batch()
    groups = torch.arange(BATCH)
    _fill_queue(cots.queues, [10, 11, 12, 13, 1, 14])  # slot 4 holds another caption of image 1
    queue_image, queue_text = cots.queues.image.clone(), cots.queues.text.clone()
    features, image, text = _features(online, images, tokens)
    out = cots(features, groups, online=online, images=images, tokens=tokens)

    with torch.no_grad():
        t = float(features.temperature)
        image_m, text_m = image.detach(), text.detach()  # momentum 0: keys = online features
        logits_i2t = image @ torch.cat([text_m, queue_text]).t() / t
        logits_t2i = text @ torch.cat([image_m, queue_image]).t() / t
        # Positives: the diagonal, and for image 1 also queue slot 4 (column BATCH + 4).
        target = torch.eye(BATCH, BATCH + QUEUE)
        target[1, BATCH + 4] = 1.0
        target = target / target.sum(dim=1, keepdim=True)
        loss_i2t = -(target * F.log_softmax(logits_i2t, dim=1)).sum(dim=1).mean()
        loss_t2i = -(target * F.log_softmax(logits_t2i, dim=1)).sum(dim=1).mean()
        p = F.softmax(logits_i2t[:, BATCH:], dim=1)
        q = F.softmax(logits_t2i[:, BATCH:], dim=1)
        loss_kl = ((p - q) * (p.log() - q.log())).sum(dim=1).mean()
        # Over all columns the in-batch positive would weigh in: a different number.
        p_all, q_all = F.softmax(logits_i2t, dim=1), F.softmax(logits_t2i, dim=1)
        kl_all = ((p_all - q_all) * (p_all.log() - q_all.log())).sum(dim=1).mean()

    assert out.parts["loss_i2t"] == pytest.approx(float(loss_i2t), rel=1e-5)
    assert out.parts["loss_t2i"] == pytest.approx(float(loss_t2i), rel=1e-5)
    assert out.parts["loss_kl"] == pytest.approx(float(loss_kl), rel=1e-4)
    assert abs(float(kl_all) - float(loss_kl)) > 1e-3  # the KL ignores the in-batch columns
    expected = (loss_i2t + loss_t2i) / 2 + 0.5 * loss_kl
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # The queue mass diagnostic is the softmax mass on the queue columns.
    mass = float(F.softmax(logits_i2t, dim=1)[:, BATCH:].sum(dim=1).mean())
    assert out.parts["queue_mass"] == pytest.approx(mass, rel=1e-5)


def test_the_kl_term_does_not_depend_on_the_in_batch_keys() -> None:
    images, tokens = _batch()
    results = []
    for perturb in (False, True):
        # momentum 0.999: the keys come from the momentum towers, which barely follow
        online, cots = _objective(kl_weight=1.0, momentum=0.999)
        _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
        if perturb:  # other momentum towers: other in-batch keys, the same queue
            generator = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for parameter in cots.momentum_towers.parameters():
                    parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        features, _, _ = _features(online, images, tokens)
        results.append(
            cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
        )
    assert results[1].parts["loss_i2t"] != pytest.approx(results[0].parts["loss_i2t"], rel=1e-3)
    assert results[1].parts["loss_kl"] == pytest.approx(results[0].parts["loss_kl"], rel=1e-5)


def test_pairs_the_filter_drops_never_reach_the_queue() -> None:
    online, cots = _objective(
        kl_weight=0.0, filter=FilterConfig(enabled=True, alpha=0.0, ema=0.999, warmup_steps=0)
    )
    images, tokens = _batch(3)
    groups = torch.tensor([100, 101, 102, 103])
    with torch.no_grad():
        _, image, text = _features(online, images, tokens)
        sims = (image * text).sum(dim=-1)
    # A threshold between the pairs' similarities: the filter keeps the upper half.
    cots.filter.threshold.fill_(float(sims.median()) + 1e-6)
    cots.filter.steps.fill_(1)
    features, _, _ = _features(online, images, tokens)
    out = cots(features, groups, online=online, images=images, tokens=tokens)
    kept = sims >= cots.filter.threshold
    assert 0 < int(kept.sum()) < BATCH
    assert out.parts["filtered_frac"] == pytest.approx(1 - float(kept.float().mean()))
    filled = int(cots.queues.filled)
    assert filled == int(kept.sum())
    assert cots.queues.groups[:filled].tolist() == groups[kept].tolist()


def test_identical_captions_are_positives_only_when_asked() -> None:
    tokens = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 8]])
    ids = caption_ids(tokens)
    assert ids[0] == ids[1] != ids[2]
    groups = torch.tensor([0, 1, 2])  # three images; the first two share a caption
    by_image = multi_positive_targets(groups, groups)
    by_caption = multi_positive_targets(groups, groups, None, ids, ids)
    assert torch.equal(by_image, torch.eye(3))
    assert by_caption[0].tolist() == [0.5, 0.5, 0.0]
    assert by_caption[1].tolist() == [0.5, 0.5, 0.0]
    assert by_caption[2].tolist() == [0.0, 0.0, 1.0]


def test_caption_positives_reach_the_queue_columns() -> None:
    online, cots = _objective(kl_weight=0.0, caption_positives=True)
    images, tokens = _batch()
    ids = caption_ids(tokens).tolist()
    # Slot 2 holds another image (group 12) captioned exactly like batch pair 3.
    _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15], [0, 0, ids[3], 0, 0, 0])
    features, _, _ = _features(online, images, tokens)
    out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
    online_off, cots_off = _objective(kl_weight=0.0)
    _fill_queue(cots_off.queues, [10, 11, 12, 13, 14, 15], [0, 0, ids[3], 0, 0, 0])
    features_off, _, _ = _features(online_off, images, tokens)
    off = cots_off(
        features_off, torch.arange(BATCH), online=online_off, images=images, tokens=tokens
    )
    assert out.parts["loss_i2t"] != pytest.approx(off.parts["loss_i2t"])
    # Without caption positives, that slot is a duplicate negative for one query of four.
    assert off.parts["queue_duplicate_negatives"] == pytest.approx(1 / 6 / BATCH)


def test_distilled_targets_are_distributions_between_hard_and_teacher() -> None:
    hard = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    teacher = torch.tensor([[2.0, 1.0, float("-inf")], [0.0, 0.0, 0.0]])
    soft = distilled_targets(hard, teacher, 0.4)
    assert torch.allclose(soft.sum(dim=1), torch.ones(2))
    assert soft[0, 2] == 0.0  # an invalid key gets no mass from the teacher either
    expected = 0.6 * hard + 0.4 * torch.softmax(teacher, dim=1)
    assert torch.allclose(soft, expected)
    assert torch.equal(distilled_targets(hard, teacher, 0.0), hard)


def test_distillation_with_identical_teacher_and_student_lowers_the_loss_floor() -> None:
    online, cots = _objective(kl_weight=0.0, distill_alpha=0.4)
    images, tokens = _batch()
    _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
    features, _, _ = _features(online, images, tokens)
    out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
    assert out.parts["distill_alpha"] == pytest.approx(0.4)
    online_hard, cots_hard = _objective(kl_weight=0.0)
    _fill_queue(cots_hard.queues, [10, 11, 12, 13, 14, 15])
    features_hard, _, _ = _features(online_hard, images, tokens)
    hard = cots_hard(
        features_hard, torch.arange(BATCH), online=online_hard, images=images, tokens=tokens
    )
    # Soft targets from the (identical) momentum towers move the targets towards the model's
    # own distribution, so the cross-entropy against them is lower.
    assert out.parts["loss_i2t"] < hard.parts["loss_i2t"]


def test_schedules_at_their_endpoints() -> None:
    assert linear_ramp(0, 10, 20) == 0.0
    assert linear_ramp(10, 10, 20) == 0.0
    assert linear_ramp(20, 10, 20) == pytest.approx(0.5)
    assert linear_ramp(30, 10, 20) == 1.0
    assert linear_ramp(99, 10, 20) == 1.0
    assert linear_ramp(10, 10, 0) == 1.0
    assert momentum_at(0, 0.9, 0.999, 100) == pytest.approx(0.9)
    assert momentum_at(50, 0.9, 0.999, 100) == pytest.approx((0.9 + 0.999) / 2)
    assert momentum_at(100, 0.9, 0.999, 100) == pytest.approx(0.999)
    assert momentum_at(1000, 0.9, 0.999, 100) == pytest.approx(0.999)
    assert momentum_at(50, 0.9, None, 100) == 0.9


def test_the_queue_opens_after_its_warm_up_and_grows_from_the_newest_slots() -> None:
    _, cots = _objective(total_steps=10, queue_warmup=0.2, queue_ramp=0.2)
    _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
    cots.queues.ptr.fill_(2)  # slot 1 is the newest, then 0, 5, 4, ...
    assert not cots.queue_mask().any()
    cots.steps.fill_(3)  # halfway through the ramp: the newest half
    assert cots.queue_mask().tolist() == [True, True, False, False, False, True]
    cots.steps.fill_(4)
    assert cots.queue_mask().all()


def test_objective_steps_advance_the_momentum_schedule() -> None:
    online, cots = _objective(
        total_steps=10, kl_weight=0.0, momentum=0.5, momentum_final=0.9, momentum_ramp=0.2
    )
    images, tokens = _batch()
    seen = []
    for _ in range(3):
        features, _, _ = _features(online, images, tokens)
        seen.append(
            cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens).parts[
                "momentum"
            ]
        )
    assert seen == pytest.approx([0.5, 0.7, 0.9])


def test_spread_measures_tell_a_cone_from_spread_features() -> None:
    spread = torch.eye(8)
    cone = F.normalize(torch.ones(8, 8) + 0.01 * torch.eye(8), dim=-1)
    assert mean_pairwise_cosine(spread) == pytest.approx(0.0)
    assert mean_pairwise_cosine(cone) > 0.99
    assert effective_rank(spread) > 6.5
    assert effective_rank(torch.ones(8, 1) @ torch.randn(1, 8)) == pytest.approx(1.0, abs=0.05)
    assert not math.isnan(effective_rank(cone))


# --- The KL alignment term and the filter, each against its definition. ---


def _leaf_features(
    online: OnlineModel, images: torch.Tensor, tokens: torch.Tensor, seed: int = 7
) -> tuple[Features, torch.Tensor, torch.Tensor]:
    """The online model's features with image and text [B, D] replaced by leaves of our own
    (not normalised: the objective normalises them), so that their gradients can be read."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(BATCH, DIM, generator=generator).requires_grad_()
    text = torch.randn(BATCH, DIM, generator=generator).requires_grad_()
    return dataclasses.replace(online(images, tokens), image=image, text=text), image, text


def _loss_by_hand(
    image: torch.Tensor,
    text: torch.Tensor,
    batch_keys: tuple[torch.Tensor, torch.Tensor],
    queues: tuple[torch.Tensor, torch.Tensor],
    temperature: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The objective's terms written out for B distinct images (the positive of row i is column
    i) over the keys [batch ; queue]: InfoNCE both ways, and KL(p||q) + KL(q||p) of the two
    softmaxes over the queue columns; each the mean over the kept rows."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    (image_m, text_m), (queue_image, queue_text) = batch_keys, queues
    logits_i2t = image @ torch.cat([text_m, queue_text]).t() / temperature
    logits_t2i = text @ torch.cat([image_m, queue_image]).t() / temperature
    rows = torch.arange(len(image))
    i2t = -F.log_softmax(logits_i2t, dim=1)[rows, rows]
    t2i = -F.log_softmax(logits_t2i, dim=1)[rows, rows]
    p = F.softmax(logits_i2t[:, len(image) :], dim=1)
    q = F.softmax(logits_t2i[:, len(image) :], dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1) + (q * (q.log() - p.log())).sum(dim=1)
    kept = torch.ones(len(image), dtype=torch.bool) if keep is None else keep
    return {"loss_i2t": i2t[kept].mean(), "loss_t2i": t2i[kept].mean(), "loss_kl": kl[kept].mean()}


def _kl_by_hand(
    image: torch.Tensor,
    text: torch.Tensor,
    queue_image: torch.Tensor,
    queue_text: torch.Tensor,
    temperature: float,
) -> list[float]:
    """Per row, in plain floats: p_j ~ exp(image . text slot j / t) (image -> text retrieval
    over the queue), q_j ~ exp(text . image slot j / t) (text -> image over the same slots), and
    KL(p||q) + KL(q||p)."""
    kls = []
    for i in range(len(image)):
        a = [float(image[i] @ queue_text[j]) / temperature for j in range(len(queue_text))]
        b = [float(text[i] @ queue_image[j]) / temperature for j in range(len(queue_image))]
        p = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        q = [math.exp(x) / sum(math.exp(y) for y in b) for x in b]
        pairs = zip(p, q, strict=True)
        kls.append(sum(pj * math.log(pj / qj) + qj * math.log(qj / pj) for pj, qj in pairs))
    return kls


def _perturb_momentum_towers(cots: CotsObjective) -> None:
    """Move the momentum towers away from the online ones, so momentum keys and online features
    differ."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in cots.momentum_towers.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@torch.no_grad()
def _keys_by_hand(
    towers: Towers,
    online: OnlineModel,
    momentum: float,
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``towers`` (our own copy of the momentum towers) one EMA step towards the online
    towers, by the definition, and return its normalised keys: image [B, D], text [B, D]."""
    for target, source in zip(towers.parameters(), online.towers.parameters(), strict=True):
        target.copy_(momentum * target + (1.0 - momentum) * source)
    towers.eval()
    return towers.encode_image(images), towers.encode_text(tokens)


def test_the_kl_term_is_the_symmetric_kl_of_the_two_retrieval_distributions_over_the_queue() -> (
    None
):
    online, cots = _objective(kl_weight=1.0)
    _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
    queue_image, queue_text = cots.queues.image.clone(), cots.queues.text.clone()
    images, tokens = _batch()
    features, image, text = _leaf_features(online, images, tokens)
    out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
    with torch.no_grad():
        image_n, text_n = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
        t = float(features.temperature)
        by_hand = _kl_by_hand(image_n, text_n, queue_image, queue_text, t)
        # The queues the other way round (image against image slots): not the same number.
        crossed = _kl_by_hand(image_n, text_n, queue_text, queue_image, t)
    assert min(by_hand) > 1e-3
    assert out.parts["loss_kl"] == pytest.approx(sum(by_hand) / BATCH, rel=1e-4)
    assert abs(sum(crossed) - sum(by_hand)) / BATCH > 1e-2


def test_the_kl_term_is_zero_when_the_two_distributions_agree() -> None:
    # Swapping neighbouring coordinates is its own inverse: with text = swap(image) and the text
    # queue = swap(image queue), image . text slot j == text . image slot j for every j, so the
    # two retrieval distributions agree although image and text features differ.
    swap = torch.arange(DIM).view(-1, 2).flip(1).flatten()
    results = []
    for aligned in (True, False):
        online, cots = _objective(kl_weight=1.0)
        _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
        if aligned:
            cots.queues.text.copy_(cots.queues.image[:, swap])
        images, tokens = _batch()
        features, image, _ = _leaf_features(online, images, tokens)
        features = dataclasses.replace(features, text=image.detach()[:, swap])
        assert not torch.allclose(features.image, features.text)
        results.append(
            cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
        )
    matched, unmatched = results
    assert matched.parts["loss_kl"] == pytest.approx(0.0, abs=1e-6)
    assert matched.parts["loss_i2t"] > 0.1  # the other terms are not zero
    assert unmatched.parts["loss_kl"] > 1e-2


def test_the_kl_gradient_reaches_both_online_features_and_nothing_else() -> None:
    images, tokens = _batch()
    grads = []
    for kl_weight in (0.0, 1.0):
        online, cots = _objective(kl_weight=kl_weight)
        _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
        queues = (cots.queues.image.clone(), cots.queues.text.clone())
        features, image, text = _leaf_features(online, images, tokens)
        out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
        grads.append(torch.autograd.grad(out.loss, [image, text, online.temperature]))
        assert not cots.queues.image.requires_grad
        assert not cots.queues.text.requires_grad
        assert all(not p.requires_grad for p in cots.momentum_towers.parameters())
    # The KL term's own gradient, by the definition, from the same leaves.
    with torch.no_grad():
        batch_keys = (online.towers.encode_image(images), online.towers.encode_text(tokens))
    kl = _loss_by_hand(image, text, batch_keys, queues, online.temperature)["loss_kl"]
    expected = torch.autograd.grad(kl, [image, text, online.temperature])
    for without_kl, with_kl, by_hand in zip(*grads, expected, strict=True):
        assert torch.allclose(with_kl - without_kl, by_hand, atol=1e-5, rtol=1e-4)
    # Both distributions move: the image -> text one through the image features, the
    # text -> image one through the text features.
    assert float(expected[0].norm()) > 1e-3
    assert float(expected[1].norm()) > 1e-3


def test_pairs_the_filter_drops_are_left_out_of_every_loss_term() -> None:
    online, cots = _objective(
        kl_weight=0.5, filter=FilterConfig(enabled=True, alpha=0.0, ema=0.999, warmup_steps=0)
    )
    _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
    queues = (cots.queues.image.clone(), cots.queues.text.clone())
    images, tokens = _batch(3)
    with torch.no_grad():  # momentum 0: the momentum keys are the online towers' features
        batch_keys = (online.towers.encode_image(images), online.towers.encode_text(tokens))
        sims = (batch_keys[0] * batch_keys[1]).sum(dim=-1)
    cots.filter.threshold.fill_(float(sims.median()) + 1e-6)
    cots.filter.steps.fill_(1)
    features, image, text = _leaf_features(online, images, tokens)
    out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
    kept = sims >= cots.filter.threshold
    assert 0 < int(kept.sum()) < BATCH
    with torch.no_grad():
        on_kept = _loss_by_hand(image, text, batch_keys, queues, features.temperature, kept)
        on_all = _loss_by_hand(image, text, batch_keys, queues, features.temperature)
    for name, value in on_kept.items():
        assert out.parts[name] == pytest.approx(float(value), rel=1e-4), name
        assert abs(float(on_all[name]) - float(value)) > 1e-3, name
    expected = (on_kept["loss_i2t"] + on_kept["loss_t2i"]) / 2 + 0.5 * on_kept["loss_kl"]
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    # A dropped pair teaches nothing: its features get no gradient (the in-batch keys are the
    # momentum keys here, so its features enter only its own rows).
    grad_image, grad_text = torch.autograd.grad(out.loss, [image, text])
    assert torch.equal(grad_image[~kept], torch.zeros_like(grad_image[~kept]))
    assert torch.equal(grad_text[~kept], torch.zeros_like(grad_text[~kept]))
    assert bool((grad_image[kept].norm(dim=1) > 0).all())
    assert bool((grad_text[kept].norm(dim=1) > 0).all())


def test_the_filter_threshold_is_a_moving_average_of_each_batch_momentum_similarities() -> None:
    alpha, ema, momentum = 0.5, 0.6, 0.5
    online, cots = _objective(
        kl_weight=0.0,
        momentum=momentum,
        filter=FilterConfig(enabled=True, alpha=alpha, ema=ema, warmup_steps=0, max_drop=1.0),
    )
    _perturb_momentum_towers(cots)
    towers = copy.deepcopy(cots.momentum_towers)
    threshold: float | None = None
    online_threshold: float | None = None
    dropped = 0
    for step in range(4):
        images, tokens = _batch(step)
        image_m, text_m = _keys_by_hand(towers, online, momentum, images, tokens)
        sims = (image_m * text_m).sum(dim=-1)
        stat = float(sims.mean() - alpha * sims.std(unbiased=False))
        # the first batch sets the threshold, later ones move it by 1 - ema
        threshold = stat if threshold is None else ema * threshold + (1 - ema) * stat
        features, image, text = _features(online, images, tokens)
        online_sims = (image * text).sum(dim=-1).detach()
        online_stat = float(online_sims.mean() - alpha * online_sims.std(unbiased=False))
        online_threshold = (
            online_stat
            if online_threshold is None
            else ema * online_threshold + (1 - ema) * online_stat
        )
        out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
        assert out.parts["filter_threshold"] == pytest.approx(threshold, abs=1e-5), step
        assert abs(online_threshold - threshold) > 1e-3  # the online similarities would not do
        kept = sims >= threshold
        assert out.parts["filtered_frac"] == pytest.approx(1 - float(kept.float().mean())), step
        dropped += int((~kept).sum())
    assert dropped > 0


def test_nothing_is_dropped_during_the_filter_warm_up() -> None:
    online, cots = _objective(
        kl_weight=0.0, filter=FilterConfig(enabled=True, alpha=0.0, ema=0.5, warmup_steps=2)
    )
    filtered, enqueued, under = [], [], []
    for step in range(3):
        images, tokens = _batch(step)
        filled = int(cots.queues.filled)
        features, image, text = _features(online, images, tokens)
        sims = (image * text).sum(dim=-1).detach()  # momentum 0: the momentum similarities
        out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
        under.append(int((sims < cots.filter.threshold).sum()))
        filtered.append(out.parts["filtered_frac"])
        enqueued.append(int(cots.queues.filled) - filled)
    # Every step has pairs under the threshold (alpha 0: the threshold is a mean) ...
    assert all(count > 0 for count in under)
    # ... but the two warm-up steps keep them all, in the loss and in the queue,
    assert filtered[:2] == [0.0, 0.0]
    assert enqueued[:2] == [BATCH, QUEUE - BATCH]  # the queue is full after the second
    # and the first step after the warm-up drops them.
    assert filtered[2] == pytest.approx(under[2] / BATCH)


def test_steps_without_diagnostics_train_exactly_as_steps_with_them() -> None:
    """Diagnostics are computed only for logged steps (issue 40 item 5): turning them off
    leaves the loss, its gradients, the queues, the filter and the schedules' clock exactly as
    they are with them, over several steps with the queue and momentum working."""
    runs = []
    for diagnostics in (True, False):
        online, cots = _objective(
            total_steps=10, kl_weight=0.5, momentum=0.5, distill_alpha=0.4, queue_size=QUEUE
        )
        cots.diagnostics = diagnostics
        losses, grads = [], []
        for step in range(3):
            images, tokens = _batch(seed=step)
            features, _, _ = _features(online, images, tokens)
            out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
            online.zero_grad()
            out.loss.backward()
            losses.append(float(out.loss.detach()))
            grads.append(
                torch.cat([p.grad.flatten() for p in online.parameters() if p.grad is not None])
            )
            assert ("image_erank" in out.parts) is diagnostics
            assert "loss" in out.parts
        runs.append((losses, grads, {k: v.clone() for k, v in cots.state_dict().items()}))
    (losses_on, grads_on, state_on), (losses_off, grads_off, state_off) = runs
    assert losses_on == losses_off
    for on, off in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(on, off, rtol=0, atol=0)
    assert state_on.keys() == state_off.keys()
    for key, value in state_on.items():
        torch.testing.assert_close(value, state_off[key], rtol=0, atol=0, msg=key)
