"""Caption-word prediction (``objective.word_prediction``, model/word_head.py): the vocabulary
and IDF weights of hand-written captions, the targets, the loss, and runs that train it, log it
and resume exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model.clip_tokens import EOT_ID, SOT_ID
from model.config import ObjectiveConfig
from model.errors import ModelError
from model.factory import create_towers
from model.objectives import OnlineModel
from model.tokenizer import tokenize
from model.word_head import (
    BIGRAM_SHIFT,
    MIN_BIGRAM_CAPTIONS,
    WordHead,
    word_loss,
    word_vocabulary,
)
from tests.test_training import _assert_resume_is_exact, micro
from training.checkpoint import load_checkpoint
from training.train import train

# Not the synthetic corpus's phrasing: a user's own captions.
CAPTIONS = [
    "a dog asleep on the sofa",
    "the dog runs across a beach",
    "a sofa in the sun",
    "sunset over the beach",
]
CONTEXT = 16


@pytest.fixture
def corpus(synth_images_200: Path) -> Path:
    return synth_images_200


def _id(word: str) -> int:
    return int(tokenize([word], CONTEXT)[0, 1])


def test_the_vocabulary_is_the_captions_words_with_their_inverse_document_frequency() -> None:
    vocab, idf = word_vocabulary([tokenize(CAPTIONS, CONTEXT)])
    assert torch.equal(vocab, vocab.sort().values)
    assert not set(vocab.tolist()) & {0, SOT_ID, EOT_ID}
    weight = dict(zip(vocab.tolist(), idf.tolist(), strict=True))
    n = len(CAPTIONS)
    assert weight[_id("the")] == pytest.approx(0.0)  # in every caption: it says nothing
    assert weight[_id("a")] == pytest.approx(math.log(n / 3))  # in three of the four
    assert weight[_id("dog")] == pytest.approx(math.log(n / 2))
    assert weight[_id("sunset")] == pytest.approx(math.log(n / 1))
    assert _id("cat") not in weight


def test_a_word_said_twice_counts_once_in_its_document_frequency() -> None:
    vocab, idf = word_vocabulary([tokenize(["a dog and a dog", "a cat"], CONTEXT)])
    weight = dict(zip(vocab.tolist(), idf.tolist(), strict=True))
    assert weight[_id("a")] == pytest.approx(0.0)  # in every caption: it says nothing
    assert weight[_id("dog")] == pytest.approx(math.log(2))


def test_targets_weigh_each_known_word_once_by_its_idf_and_sum_to_one() -> None:
    vocab, idf = word_vocabulary([tokenize(CAPTIONS, CONTEXT)])
    head = WordHead(8, vocab, idf)
    tokens = tokenize(["the dog and the dog and a cat", "cat kitten", "sunset"], CONTEXT)
    targets = head.targets(tokens)
    column = {int(v): i for i, v in enumerate(vocab)}
    first = targets[0]
    assert float(first.sum()) == pytest.approx(1.0)
    article, dog = first[column[_id("a")]], first[column[_id("dog")]]
    # "dog" said twice still weighs by its IDF alone; "cat" and "and" are unknown
    assert float(article / dog) == pytest.approx(math.log(4 / 3) / math.log(2), rel=1e-5)
    assert float(first[column[_id("the")]]) == pytest.approx(0.0)  # in every caption
    assert float(targets[1].sum()) == 0.0  # nothing it says is in the vocabulary
    assert float(targets[2, column[_id("sunset")]]) == pytest.approx(1.0)


def test_the_loss_is_the_cross_entropy_over_kept_rows_with_words() -> None:
    torch.manual_seed(0)
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    logits = torch.randn(4, 3)
    keep = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last pair was filtered out as noisy
    loss, accuracy = word_loss(logits, targets, keep)
    log_p = torch.log_softmax(logits, dim=1)
    expected = (-(targets[0] * log_p[0]).sum() - log_p[2, 2]) / 2
    assert float(loss) == pytest.approx(float(expected))
    hits = [bool(targets[i, int(logits[i].argmax())] > 0) for i in (0, 2)]
    assert accuracy == pytest.approx(sum(hits) / 2)


def test_a_head_that_names_the_words_has_a_lower_loss_than_one_that_does_not() -> None:
    targets = torch.tensor([[0.5, 0.5, 0.0]])
    keep = torch.ones(1)
    right, _ = word_loss(torch.tensor([[5.0, 5.0, -5.0]]), targets, keep)
    wrong, accuracy = word_loss(torch.tensor([[-5.0, -5.0, 5.0]]), targets, keep)
    assert float(right) < 0.7 < float(wrong)
    assert accuracy == 0.0


def test_word_prediction_needs_its_vocabulary() -> None:
    config = ObjectiveConfig(word_prediction={"weight": 1.0})
    with pytest.raises(ModelError, match="vocabulary"):
        OnlineModel(create_towers("cots-micro"), config)
    with pytest.raises(ModelError, match="captions"):
        word_vocabulary([torch.zeros(0, CONTEXT, dtype=torch.long)])


def test_a_run_with_word_prediction_logs_it_and_keeps_the_head_in_its_checkpoint(
    corpus: Path, tmp_path: Path
) -> None:
    config = micro(corpus, tmp_path / "run", objective={"word_prediction": {"weight": 1.0}})
    train(config, progress=False)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in rows if "loss_words" in r]
    assert len(logged) == 20
    assert all(0.0 <= r["word_accuracy"] <= 1.0 for r in logged)
    # the head learns the corpus's words: its loss falls over the two epochs
    first, last = logged[0]["loss_words"], logged[-1]["loss_words"]
    assert last < first
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert {"words.linear.weight", "words.vocab", "words.idf"} <= set(state)


def test_a_run_with_word_prediction_resumes_exactly(corpus: Path, tmp_path: Path) -> None:
    _assert_resume_is_exact(corpus, tmp_path, objective={"word_prediction": {"weight": 1.0}})


def test_with_text_the_same_head_names_the_captions_words_from_the_text_embedding_too() -> None:
    torch.manual_seed(0)
    tokens = tokenize(CAPTIONS, CONTEXT)
    vocab = word_vocabulary([tokens])
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    towers = create_towers("cots-micro")
    both = OnlineModel(
        towers, ObjectiveConfig(word_prediction={"weight": 1.0, "text": True}), word_vocab=vocab
    )
    features = both(images, tokens)
    assert features.word_logits is not None
    assert features.text_word_logits is not None
    assert features.word_targets is not None
    words = both.words
    assert words is not None
    torch.testing.assert_close(features.text_word_logits, words(features.text))
    image_only = OnlineModel(
        towers, ObjectiveConfig(word_prediction={"weight": 1.0}), word_vocab=vocab
    )
    assert image_only(images, tokens).text_word_logits is None


# Each attribute-object pair said by enough captions to enter a bigram vocabulary, in
# phrasings of a user's own (not the synthetic corpus's templates).
PAIRED = [
    f"{opener} {colour} {shape}"
    for colour in ("blue", "green")
    for shape in ("star", "square")
    for opener in ("a", "my", "one", "the old", "that", "this")
]


def test_with_bigrams_the_vocabulary_adds_the_word_pairs_enough_captions_say() -> None:
    tokens = tokenize([*PAIRED, "a blue moon"], CONTEXT)
    words, word_idf = word_vocabulary([tokens])
    keys, idf = word_vocabulary([tokens], bigrams=True)
    pairs = (keys >> BIGRAM_SHIFT) > 0
    # the words and their weights are the ones without pairs
    assert torch.equal(keys[~pairs], words)
    assert torch.equal(idf[~pairs], word_idf)
    weight = dict(zip(keys.tolist(), idf.tolist(), strict=True))
    blue_star = (_id("blue") << BIGRAM_SHIFT) | _id("star")
    assert weight[blue_star] == pytest.approx(math.log(len(PAIRED) + 1) - math.log(6))
    # "blue moon" is said once, "a blue" twice: under MIN_BIGRAM_CAPTIONS, not in it
    assert MIN_BIGRAM_CAPTIONS > 2
    assert (_id("blue") << BIGRAM_SHIFT) | _id("moon") not in weight
    assert (_id("a") << BIGRAM_SHIFT) | _id("blue") not in weight
    # pairs with the start or end of text are no word pairs
    assert all(
        int(key) >> BIGRAM_SHIFT not in (SOT_ID, 0) and int(key) & 0xFFFFF != EOT_ID
        for key in keys[pairs]
    )


def test_bigram_targets_tell_which_colour_goes_with_which_shape() -> None:
    """A bag of words scores "a blue star and a green square" and "a green star and a blue
    square" alike; with pairs their targets differ, in exactly the swapped bindings."""
    tokens = tokenize(PAIRED, CONTEXT)
    queries = tokenize(["a blue star and a green square", "a green star and a blue square"], 16)
    words = WordHead(8, *word_vocabulary([tokens])).targets(queries)
    assert torch.equal(words[0], words[1])
    head = WordHead(8, *word_vocabulary([tokens], bigrams=True))
    assert head.bigrams
    paired = head.targets(queries)
    assert float(paired[0].sum()) == pytest.approx(1.0)
    differ = {int(head.vocab[i]) for i in (paired[0] != paired[1]).nonzero()[:, 0]}
    assert differ == {
        (_id(colour) << BIGRAM_SHIFT) | _id(shape)
        for colour, shape in (
            ("blue", "star"),
            ("green", "square"),
            ("green", "star"),
            ("blue", "square"),
        )
    }


def test_a_run_with_bigram_prediction_keeps_its_pairs_and_resumes_exactly(
    corpus: Path, tmp_path: Path
) -> None:
    objective = {"word_prediction": {"weight": 1.0, "text": True, "bigrams": True}}
    _assert_resume_is_exact(corpus, tmp_path, objective=objective)
    config = micro(corpus, tmp_path / "run", objective=objective)
    train(config, progress=False)
    vocab = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]["words.vocab"]
    assert int(((vocab >> BIGRAM_SHIFT) > 0).sum()) > 0
