"""The COTS objective's aligned queues: the momentum keys of a pair enter the image and the
text queue at one shared pointer that wraps, after the loss has read the old queue, and under
DDP every rank enqueues the kept keys of all ranks, in rank order."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed
import torch.multiprocessing

from model.distributed import DistInfo
from model.losses import caption_ids
from model.noise_filter import AdaptiveMomentumFilter
from tests.gloo import run_ranks, save_result
from tests.test_cots_objective import (
    BATCH,
    QUEUE,
    _batch,
    _features,
    _fill_queue,
    _keys_by_hand,
    _leaf_features,
    _loss_by_hand,
    _objective,
    _perturb_momentum_towers,
)


def test_momentum_keys_enter_both_queues_at_one_pointer_that_wraps() -> None:
    online, cots = _objective(kl_weight=0.0, momentum=0.5)
    _perturb_momentum_towers(cots)
    towers = copy.deepcopy(cots.momentum_towers)
    written: dict[int, tuple[torch.Tensor, torch.Tensor, int, int]] = {}
    ptr = 0
    # 4 pairs a step into 6 slots: slots 0-3, then 4, 5, 0, 1 (the wrap), then 2-5.
    expected_groups = [[0, 1, 2, 3, -1, -1], [12, 13, 2, 3, 10, 11], [12, 13, 20, 21, 22, 23]]
    for step in range(3):
        images, tokens = _batch(step)
        groups = torch.arange(BATCH) + 10 * step
        image_m, text_m = _keys_by_hand(towers, online, 0.5, images, tokens)
        features, image, text = _features(online, images, tokens)
        # the momentum keys are not the online features
        assert not torch.allclose(image_m, image.detach(), atol=1e-2)
        assert not torch.allclose(text_m, text.detach(), atol=1e-2)
        cots(features, groups, online=online, images=images, tokens=tokens)
        captions = caption_ids(tokens)
        for row in range(BATCH):
            written[(ptr + row) % QUEUE] = (
                image_m[row],
                text_m[row],
                int(groups[row]),
                int(captions[row]),
            )
        ptr = (ptr + BATCH) % QUEUE
        queues = cots.queues
        assert int(queues.ptr) == ptr
        assert int(queues.filled) == min(QUEUE, BATCH * (step + 1))
        assert queues.groups.tolist() == expected_groups[step]
        for slot, (image_key, text_key, group, caption) in written.items():
            # column `slot` of both queues holds the momentum keys of one and the same pair
            assert torch.allclose(queues.image[slot], image_key, atol=1e-5), (step, slot)
            assert torch.allclose(queues.text[slot], text_key, atol=1e-5), (step, slot)
            assert int(queues.groups[slot]) == group
            assert int(queues.captions[slot]) == caption


def test_the_batch_is_enqueued_after_the_loss_has_read_the_old_queue() -> None:
    online, cots = _objective(kl_weight=0.5)
    _fill_queue(cots.queues, [10, 11, 12, 13, 14, 15])
    old = (cots.queues.image.clone(), cots.queues.text.clone())
    images, tokens = _batch()
    features, image, text = _leaf_features(online, images, tokens)
    out = cots(features, torch.arange(BATCH), online=online, images=images, tokens=tokens)
    with torch.no_grad():  # momentum 0: the momentum keys are the online towers' features
        batch_keys = (online.towers.encode_image(images), online.towers.encode_text(tokens))
    # After the step, slots 0-3 hold this batch's keys and slots 4, 5 the old ones.
    new = (cots.queues.image.clone(), cots.queues.text.clone())
    assert torch.allclose(new[0][:BATCH], batch_keys[0], atol=1e-5)
    assert torch.allclose(new[1][:BATCH], batch_keys[1], atol=1e-5)
    assert torch.equal(new[0][BATCH:], old[0][BATCH:])
    assert torch.equal(new[1][BATCH:], old[1][BATCH:])

    def total(queues: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        terms = _loss_by_hand(image, text, batch_keys, queues, features.temperature)
        return (terms["loss_i2t"] + terms["loss_t2i"]) / 2 + 0.5 * terms["loss_kl"]

    with_old, with_new = total(old), total(new)
    assert float(out.loss.detach()) == pytest.approx(float(with_old.detach()), rel=1e-5)
    assert abs(float(with_new.detach()) - float(with_old.detach())) > 1e-2
    # The gradient, taken after the enqueue (as the trainer does), is the old queue's too.
    got = torch.autograd.grad(out.loss, [image, text])
    expected = torch.autograd.grad(with_old, [image, text])
    for a, b in zip(got, expected, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


class _GivenKeep(AdaptiveMomentumFilter):
    """A filter that keeps the pairs it is told to, one mask per step: the gathering of the kept
    keys over the ranks is under test, not what decides them."""

    def __init__(self, masks: list[list[bool]]) -> None:
        super().__init__(alpha=0.0, ema=0.0, warmup_steps=0)
        self.masks = masks

    def keep_mask(self, similarities: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.masks.pop(0))


# Per rank, per step: the pairs kept. Ranks keep different counts, and step 2 wraps the queue.
_RANK_KEEP = {
    0: [[True, False, True, True], [True, True, False, False]],
    1: [[False, True, False, False], [True, True, True, False]],
}


def _rank_steps(rank: int, folder: Path) -> None:
    """One of two gloo processes: two objective steps on its own batches, then its features and
    queue buffers after each step, saved for the test to compare."""
    online, cots = _objective(kl_weight=0.5, dist=DistInfo(rank=rank, world_size=2))
    cots.filter = _GivenKeep(copy.deepcopy(_RANK_KEEP[rank]))
    record = []
    for step in range(2):
        images, tokens = _batch(10 * step + rank)
        groups = torch.arange(BATCH) + 100 * rank + 10 * step
        features, image, text = _features(online, images, tokens)
        cots(features, groups, online=online, images=images, tokens=tokens)
        record.append(
            {
                "image": image.detach(),  # momentum 0: the momentum keys
                "text": text.detach(),
                "groups": groups,
                "captions": caption_ids(tokens),
                **{f"queues.{k}": v.clone() for k, v in cots.queues.state_dict().items()},
            }
        )
    save_result(record, rank, folder)


@pytest.mark.slow
def test_two_ranks_enqueue_the_kept_keys_of_both_in_rank_order(tmp_path: Path) -> None:
    records = run_ranks(_rank_steps, tmp_path)
    slots: dict[int, tuple[int, int, int]] = {}  # slot -> (rank, step, row) of the pair there
    ptr = 0
    for step in range(2):
        for rank in (0, 1):
            for row in range(BATCH):
                if _RANK_KEEP[rank][step][row]:
                    slots[ptr] = (rank, step, row)
                    ptr = (ptr + 1) % QUEUE
        for rank in (0, 1):  # both ranks hold the same queues: every rank's kept pairs
            record = records[rank][step]
            assert int(record["queues.ptr"]) == ptr, (rank, step)
            for slot, (source_rank, source_step, row) in slots.items():
                source = records[source_rank][source_step]
                where = (rank, step, slot)
                # (the features came from the towers in train mode, the keys in eval mode)
                image_key, text_key = record["queues.image"][slot], record["queues.text"][slot]
                assert torch.allclose(image_key, source["image"][row], atol=1e-5), where
                assert torch.allclose(text_key, source["text"][row], atol=1e-5), where
                assert int(record["queues.groups"][slot]) == int(source["groups"][row]), where
                captions = record["queues.captions"]
                assert int(captions[slot]) == int(source["captions"][row]), where
    assert ptr == 3  # 4 pairs, then 5: slots 0-3, then 4, 5, 0, 1, 2
