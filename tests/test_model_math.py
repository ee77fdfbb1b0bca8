"""The mathematics of the objectives, on tiny hand-made tensors."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.losses import (
    clip_loss,
    masked_logits,
    multi_positive_targets,
    soft_cross_entropy,
    symmetric_kl,
)
from model.momentum import FeatureQueues, ema_update
from model.noise_filter import AdaptiveMomentumFilter
from training.evaluate import retrieval_metrics


def keys(values: list[float]) -> torch.Tensor:
    """One-dimensional 'features' that make queue contents easy to read."""
    return torch.tensor(values).unsqueeze(1)


def test_queue_pointer_advances_and_wraps_around() -> None:
    queue = FeatureQueues(size=5, dim=1)
    assert not queue.valid_mask().any()
    queue.enqueue(keys([1, 2, 3]), keys([-1, -2, -3]), torch.tensor([10, 20, 30]))
    assert int(queue.ptr) == 3
    assert int(queue.filled) == 3
    assert queue.valid_mask().tolist() == [True, True, True, False, False]
    queue.enqueue(keys([4, 5, 6, 7]), keys([-4, -5, -6, -7]), torch.tensor([40, 50, 60, 70]))
    # 4 and 5 fill slots 3, 4; 6 and 7 wrap to slots 0, 1
    assert queue.image.squeeze(1).tolist() == [6, 7, 3, 4, 5]
    assert int(queue.ptr) == 2
    assert int(queue.filled) == 5
    assert queue.valid_mask().all()


def test_enqueue_keeps_image_text_and_group_aligned() -> None:
    queue = FeatureQueues(size=4, dim=1)
    for start in (0, 3, 6):
        ids = torch.arange(start, start + 3)
        queue.enqueue(ids.float().unsqueeze(1), -ids.float().unsqueeze(1), ids)
    # slot j of every buffer holds the same pair
    assert torch.equal(queue.image.squeeze(1), queue.groups.float())
    assert torch.equal(queue.text.squeeze(1), -queue.groups.float())


def test_enqueue_more_than_the_queue_keeps_the_newest() -> None:
    queue = FeatureQueues(size=3, dim=1)
    queue.enqueue(keys([1, 2, 3, 4, 5]), keys([1, 2, 3, 4, 5]), torch.arange(5))
    assert sorted(queue.image.squeeze(1).tolist()) == [3, 4, 5]
    assert int(queue.filled) == 3


def test_ema_update_is_the_exponential_moving_average() -> None:
    online, target = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        online.weight.fill_(1.0)
        online.bias.fill_(2.0)
        target.weight.fill_(0.0)
        target.bias.fill_(0.0)
    ema_update(online, target, momentum=0.9)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1))
    assert torch.allclose(target.bias, torch.full((2,), 0.2))
    ema_update(online, target, momentum=0.9)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.19))


def test_kl_of_identical_distributions_is_zero_and_positive_otherwise() -> None:
    logits = torch.randn(4, 6)
    assert torch.allclose(symmetric_kl(logits, logits), torch.zeros(4), atol=1e-6)
    # shifting every logit of a row leaves its softmax unchanged
    assert torch.allclose(symmetric_kl(logits, logits + 3.0), torch.zeros(4), atol=1e-5)
    assert (symmetric_kl(logits, torch.randn(4, 6)) > 0).all()
    masked = logits.clone()
    masked[:, 4:] = float("-inf")  # invalid queue slots contribute nothing
    assert torch.allclose(symmetric_kl(masked, masked), torch.zeros(4), atol=1e-6)
    assert torch.isfinite(symmetric_kl(masked, masked + torch.randn(4, 6))).all()


def test_symmetric_kl_matches_its_definition() -> None:
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    p, q = a.softmax(1), b.softmax(1)
    expected = (p * (p / q).log()).sum(1) + (q * (q / p).log()).sum(1)
    assert torch.allclose(symmetric_kl(a, b), expected, atol=1e-5)


def test_multi_positive_targets_share_mass_among_captions_of_one_image() -> None:
    targets = multi_positive_targets(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0, 2, 0]))
    assert targets[0].tolist() == pytest.approx([1 / 3, 0, 1 / 3, 0, 1 / 3])
    assert targets[1].tolist() == [0, 1, 0, 0, 0]
    valid = torch.tensor([True, True, True, True, False])
    targets = multi_positive_targets(torch.tensor([0]), torch.tensor([0, 1, 0, 2, 0]), valid)
    assert targets[0].tolist() == pytest.approx([0.5, 0, 0.5, 0, 0])


def test_invalid_keys_are_ignored_by_the_contrastive_loss() -> None:
    query = F.normalize(torch.randn(2, 4), dim=-1)
    keys_ = F.normalize(torch.randn(5, 4), dim=-1)
    groups, key_groups = torch.tensor([0, 1]), torch.tensor([0, 1, 7, 8, 9])
    valid = torch.tensor([True, True, True, False, False])
    temperature = torch.tensor(0.1)
    full = soft_cross_entropy(
        masked_logits(query, keys_[:3], temperature, None),
        multi_positive_targets(groups, key_groups[:3]),
    )
    masked = soft_cross_entropy(
        masked_logits(query, keys_, temperature, valid),
        multi_positive_targets(groups, key_groups, valid),
    )
    assert torch.allclose(full, masked)


def test_clip_loss_is_cross_entropy_on_the_diagonal_for_distinct_images() -> None:
    image = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    temperature = torch.tensor(0.07)
    i2t, t2i = clip_loss(image, text, torch.arange(4), temperature)
    logits = image @ text.t() / temperature
    assert torch.allclose(i2t.mean(), F.cross_entropy(logits, torch.arange(4)))
    assert torch.allclose(t2i.mean(), F.cross_entropy(logits.t(), torch.arange(4)))


def test_filter_threshold_tracks_mean_minus_alpha_std_after_warmup() -> None:
    f = AdaptiveMomentumFilter(alpha=1.0, ema=0.5, warmup_steps=1)
    first = torch.tensor([0.2, 0.4, 0.6, 0.8])
    f.update(first)
    expected = first.mean() - first.std(unbiased=False)
    assert torch.allclose(f.threshold, expected)
    assert f.keep_mask(torch.tensor([-1.0])).all()  # warm-up: everything stays
    second = torch.tensor([0.5, 0.5, 0.5, 0.5])
    f.update(second)
    expected = 0.5 * expected + 0.5 * torch.tensor(0.5)
    assert torch.allclose(f.threshold, expected)
    assert f.active
    assert f.keep_mask(torch.tensor([0.0, 0.9])).tolist() == [False, True]
    # a threshold above every pair (similarities fell faster than it followed) still keeps the
    # best half of the batch
    assert f.keep_mask(torch.tensor([-0.5, -0.4, -0.1, -0.3])).tolist() == [
        False,
        False,
        True,
        True,
    ]
    disabled = AdaptiveMomentumFilter(alpha=1.0, ema=0.5, warmup_steps=0, enabled=False)
    disabled.update(first)
    disabled.update(first)
    assert disabled.keep_mask(torch.tensor([-5.0])).all()


def _naive_ranks(queries, keys_, query_groups, key_groups) -> list[int]:
    ranks = []
    for q, g in zip(queries, query_groups, strict=True):
        # pessimistic ties: at equal score, irrelevant keys come first
        order = sorted(range(len(keys_)), key=lambda j: (-float(q @ keys_[j]), key_groups[j] == g))
        ranks.append(next(r for r, j in enumerate(order) if key_groups[j] == g))
    return ranks


def test_retrieval_metrics_match_a_naive_oracle() -> None:
    torch.manual_seed(0)
    image_groups = torch.arange(30)
    text_groups = torch.tensor([g for g in range(30) for _ in range(1 + g % 3)])
    image = F.normalize(torch.randn(30, 8), dim=-1)
    text = F.normalize(image[text_groups] + 0.8 * torch.randn(len(text_groups), 8), dim=-1)
    metrics = retrieval_metrics(image, text, image_groups, text_groups)
    t2i = torch.tensor(_naive_ranks(text, image, text_groups, image_groups))
    i2t = torch.tensor(_naive_ranks(image, text, image_groups, text_groups))
    for k, (name, ranks) in itertools.product((1, 5, 10), (("t2i", t2i), ("i2t", i2t))):
        assert metrics[f"{name}_R@{k}"] == pytest.approx(100 * float((ranks < k).float().mean()))
    assert metrics["t2i_medr"] == float((t2i + 1).float().median())
    assert 0 < metrics["t2i_R@1"] < 100  # the case is neither trivial nor hopeless


def test_retrieval_metrics_by_hand() -> None:
    image = torch.eye(3)
    # caption 1 points at image 2; image 1 then scores 0 against every caption, a three-way tie
    text = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    metrics = retrieval_metrics(image, text, torch.arange(3), torch.tensor([0, 1, 2]))
    assert metrics["t2i_R@1"] == pytest.approx(200 / 3)
    # image 1 ties with all three captions, image 2 ties with captions 1 and 2: ties are misses
    assert metrics["i2t_R@1"] == pytest.approx(100 / 3)
    assert metrics["t2i_R@5"] == 100.0
    collapsed = retrieval_metrics(
        torch.ones(3, 3), torch.ones(3, 3), torch.arange(3), torch.arange(3)
    )
    assert collapsed["t2i_R@1"] == 0.0
    assert collapsed["i2t_R@1"] == 0.0


def _objective_and_baseline(batch_keys: str, momentum: float):
    from model.config import ObjectiveConfig
    from model.distributed import DistInfo
    from model.factory import create_towers
    from model.objectives import ClipObjective, CotsObjective, OnlineModel

    torch.manual_seed(0)
    config = ObjectiveConfig(
        kind="cots",
        queue_size=0,
        kl_weight=0.0,
        momentum=momentum,
        batch_keys=batch_keys,
        # a constant momentum and hard targets: the form these equalities are about
        momentum_final=None,
        distill_alpha=0.0,
    )
    online = OnlineModel(create_towers("cots-micro"), config)
    images = torch.randn(4, 3, 32, 32)
    tokens = torch.randint(1, 49000, (4, 48))
    tokens[:, 10] = 49407
    groups = torch.arange(4)
    cots = CotsObjective(online, config, DistInfo())
    clip = ClipObjective(online, config, DistInfo())
    return online, images, tokens, groups, cots, clip


def _loss_and_grads(objective, online, images, tokens, groups):
    online.zero_grad()
    out = objective(online(images, tokens), groups, online=online, images=images, tokens=tokens)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in online.named_parameters()}


def test_cots_with_online_batch_keys_and_no_queue_is_exactly_clip() -> None:
    online, images, tokens, groups, cots, clip = _objective_and_baseline("online", 0.99)
    loss_cots, grads_cots = _loss_and_grads(cots, online, images, tokens, groups)
    loss_clip, grads_clip = _loss_and_grads(clip, online, images, tokens, groups)
    assert torch.allclose(loss_cots, loss_clip, atol=1e-6)
    for name, grad in grads_clip.items():
        # the two compute t2i as a transpose vs a second matmul: equal up to float round-off
        scale = float(grad.abs().max()) + 1e-12
        assert float((grads_cots[name] - grad).abs().max()) <= 1e-5 * scale, name


def test_momentum_keys_give_clips_loss_value_but_gradient_only_through_queries() -> None:
    # momentum 0: the momentum towers are an exact copy, so the keys equal the online features
    online, images, tokens, groups, cots, clip = _objective_and_baseline("momentum", 0.0)
    loss_cots, grads_cots = _loss_and_grads(cots, online, images, tokens, groups)
    loss_clip, grads_clip = _loss_and_grads(clip, online, images, tokens, groups)
    assert torch.allclose(loss_cots, loss_clip, atol=1e-5)
    # keys carry no gradient, so each tower learns only as a query and the gradients differ
    differing = [
        n for n in grads_clip if not torch.allclose(grads_cots[n], grads_clip[n], atol=1e-6)
    ]
    assert any(n.startswith("towers.visual") for n in differing)
    assert any(n.startswith("towers.text") for n in differing)


def test_length_bucketed_text_tower_equals_the_whole_batch() -> None:
    from model.factory import create_towers
    from model.tokenizer import tokenize

    towers = create_towers("cots-micro").eval()
    words = [
        "a",
        "big",
        "red",
        "circle",
        "on",
        "the",
        "left",
        "of",
        "a",
        "small",
        "blue",
        "star",
        "above",
        "the",
        "green",
        "ring",
    ]
    texts = [" ".join(words[: 2 + (i * 7) % (len(words) - 1)]) for i in range(24)]
    tokens = tokenize(texts, 32)
    with torch.no_grad():
        pooled, states = towers.text_tower(tokens)
        pooled_b, states_b = towers.text_tower(tokens, buckets=4)
    torch.testing.assert_close(pooled_b, pooled, atol=1e-5, rtol=1e-5)
    assert states_b.shape == states.shape
    upto_end = tokens != 0  # the states every reader uses: up to each row's end-of-text token
    torch.testing.assert_close(states_b[upto_end], states[upto_end], atol=1e-5, rtol=1e-5)
    # and trains the same: the groups share one embedding lookup, whose gradient equals the
    # whole batch's
    embedding = towers.text.token_embedding.weight  # type: ignore[union-attr]
    grads: list[torch.Tensor] = []
    for buckets in (1, 4):
        embedding.grad = None
        towers.text_tower(tokens, buckets=buckets)[0].square().sum().backward()
        assert embedding.grad is not None
        grads.append(embedding.grad.clone())
    # (summation order differs by group: a few of the largest entries move by ~3e-4 relative)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-3)


def test_text_anchor_is_zero_at_the_start_and_pulls_a_drifted_tower_back() -> None:
    from model.factory import create_towers
    from model.text_anchor import TextAnchor
    from model.tokenizer import tokenize

    towers = create_towers("cots-micro")
    tokens = tokenize(["a big red circle", "a small blue star on the left", "a ring"], 32)
    anchor = TextAnchor(towers, tokens, batch_size=8)
    assert float(anchor(towers)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for param in towers.text.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    drifted = anchor(towers)
    assert float(drifted) > 1e-3
    drifted.backward()
    assert all(p.grad is None for p in anchor.teacher.parameters())
    assert towers.text.text_projection.grad is not None  # type: ignore[union-attr]


def test_text_anchor_needs_captions_and_the_clip_objective() -> None:
    from pydantic import ValidationError

    from model.config import ObjectiveConfig

    with pytest.raises(ValidationError, match="text_anchor needs"):
        ObjectiveConfig(kind="clip", text_anchor={"weight": 1.0})
    with pytest.raises(ValidationError, match="text_anchor needs"):
        ObjectiveConfig(kind="cots", text_anchor={"weight": 1.0, "captions": "x.csv"})
    ObjectiveConfig(kind="clip", text_anchor={"weight": 1.0, "captions": "x.csv"})
