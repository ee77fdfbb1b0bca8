"""The COTS objective against hand computations: a hand-filled queue, the KL term over the
queue columns alone, the filter keeping dropped pairs out of the queue, caption-level
positives, momentum distillation and the schedules at their endpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.config import FilterConfig, ObjectiveConfig
from model.distributed import DistInfo
from model.factory import create_towers
from model.losses import (
    caption_ids,
    distilled_targets,
    effective_rank,
    mean_pairwise_cosine,
    multi_positive_targets,
)
from model.momentum import FeatureQueues
from model.objectives import CotsObjective, OnlineModel
from model.schedules import linear_ramp, momentum_at

BATCH, QUEUE, DIM = 4, 6, 64  # cots-micro's embedding is 64 wide


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(BATCH, 3, 32, 32, generator=generator)
    tokens = torch.randint(1, 49000, (BATCH, 48), generator=generator)
    tokens[:, 10] = 49407
    return images, tokens


def _objective(total_steps: int = 10, **options: object) -> tuple[OnlineModel, CotsObjective]:
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
    return online, CotsObjective(online, config, DistInfo(), total_steps=total_steps)


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
