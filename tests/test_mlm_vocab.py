"""MLM over the corpus's words (``masked.mlm_vocab: corpus``): the head's logits are the full
head's at the vocabulary's columns, only those embedding rows learn from it, masking draws its
random words from it, and a run with it resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from cots.cli import cli as main
from model.aux_inputs import SPECIAL_TEXT_IDS, make_aux_inputs, mlm_corpus_vocab
from model.clip_tokens import EOT_ID, SOT_ID
from model.config import TrainConfig
from model.data.synth import SynthConfig, generate_corpus
from model.errors import ModelError
from model.factory import CLIP_VOCAB, MASK_TOKEN_ID, build_towers
from model.masking import IGNORE_INDEX, mask_text_tokens
from model.objectives import AuxiliaryLosses, OnlineModel
from model.token_heads import MlmHead
from training.checkpoint import load_checkpoint
from training.train import resolve_image_size, train
from training.training_data import load_split


def captions(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, 24] captions of 4..20 words drawn from 40 ids, padded."""
    words = torch.randperm(49000, generator=generator)[:40] + 1
    tokens = torch.zeros(batch, 24, dtype=torch.long)
    for row in tokens:
        n = int(torch.randint(4, 21, (), generator=generator))
        row[0], row[n + 1] = SOT_ID, EOT_ID
        row[1 : n + 1] = words[torch.randint(len(words), (n,), generator=generator)]
    return tokens


def corpus_config(**masked: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {"model": "cots-micro", "objective": {"masked": {"mlm_weight": 1.0, **masked}}}
    )


def test_vocabulary_is_the_sorted_ordinary_ids_the_captions_use() -> None:
    tokens = [
        torch.tensor([[49406, 7, 3, 49407, 0, 0]]),
        torch.tensor([[49406, 3, 11, 49407, 0, 0]]),
    ]
    assert mlm_corpus_vocab(tokens).tolist() == [3, 7, 11]
    assert not set(SPECIAL_TEXT_IDS) & set(mlm_corpus_vocab(tokens).tolist())


def test_corpus_logits_are_the_full_logits_at_the_vocabulary_columns() -> None:
    torch.manual_seed(0)
    vocab = torch.tensor([3, 17, 250, 4000, 49000])
    full = MlmHead(64, 32, CLIP_VOCAB + 1)
    corpus = MlmHead(64, 32, CLIP_VOCAB + 1, vocab)
    with torch.no_grad():
        full.bias.normal_()
        corpus.predictor.load_state_dict(full.predictor.state_dict())
        corpus.bias.copy_(full.bias[vocab])
    states, image_global = torch.randn(9, 64), torch.randn(9, 32)
    embedding = torch.randn(CLIP_VOCAB + 1, 64)
    expected = full(states, image_global, embedding)[:, vocab]
    got = corpus(states, image_global, embedding)
    assert got.shape == (9, len(vocab))
    torch.testing.assert_close(got, expected)
    labels = torch.tensor([250, 3, 49000])
    assert corpus.targets(labels).tolist() == [2, 0, 4]
    assert torch.equal(full.targets(labels), labels)  # the full head's columns are the ids
    with pytest.raises(ModelError, match=r"\[18\]"):
        corpus.targets(torch.tensor([3, 18]))


def test_full_head_state_is_unchanged_and_the_corpus_head_carries_its_vocabulary() -> None:
    config = corpus_config()
    full = OnlineModel(build_towers(config), config.objective)
    assert full.mlm_vocab is None
    assert not [k for k in full.state_dict() if k.startswith("mlm.") and "vocab" in k]
    assert full.state_dict()["mlm.bias"].shape == (CLIP_VOCAB + 1,)
    vocab = torch.tensor([5, 9, 12])
    corpus = OnlineModel(build_towers(config), config.objective, mlm_vocab=vocab)
    assert torch.equal(corpus.state_dict()["mlm.vocab"], vocab)
    assert corpus.state_dict()["mlm.bias"].shape == (3,)


def test_random_replacements_come_from_the_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = captions(64, g)
    vocab = mlm_corpus_vocab([tokens])
    masked, labels = mask_text_tokens(
        tokens,
        mask_token_id=MASK_TOKEN_ID,
        vocab_size=CLIP_VOCAB,
        special_ids=SPECIAL_TEXT_IDS,
        generator=g,
        mask_prob=0.5,
        replacement_ids=vocab,
    )
    replaced = (labels != IGNORE_INDEX) & (masked != MASK_TOKEN_ID) & (masked != tokens)
    assert int(replaced.sum()) > 10
    assert torch.isin(masked[replaced], vocab).all()


def test_corpus_loss_is_finite_and_teaches_only_the_vocabulary_rows() -> None:
    """The head's gradient reaches the embedding rows of the vocabulary only; the masked
    captions' own pass through the text tower adds the rows of what it reads ([MASK], start,
    end, padding, and the words, which are all in the vocabulary)."""
    torch.manual_seed(0)
    config = corpus_config(mlm_vocab="corpus")
    g = torch.Generator().manual_seed(1)
    tokens = captions(16, g)
    vocab = mlm_corpus_vocab([tokens])
    online = OnlineModel(build_towers(config), config.objective, mlm_vocab=vocab)
    images = torch.randn(16, 3, 32, 32)
    aux = make_aux_inputs(config.objective, images, tokens, None, g, mlm_vocab=online.mlm_vocab)
    assert aux is not None
    features = online(images, tokens, aux)
    assert features.mlm_logits is not None
    assert features.mlm_logits.shape[1] == len(vocab)
    loss, parts = AuxiliaryLosses(config.objective, None)(
        features, aux, torch.zeros(0), torch.arange(16), torch.ones(16)
    )
    assert torch.isfinite(loss)
    # the corpus head reads its states from a pass cut into length groups: the same states
    assert aux.mlm_labels is not None
    assert aux.masked_tokens is not None
    assert online.mlm is not None
    chosen = aux.mlm_labels != IGNORE_INDEX
    _, whole = online.towers.text_tower(aux.masked_tokens)
    rows = chosen.nonzero()[:, 0]
    image_global = torch.nn.functional.normalize(features.image, dim=-1)[rows]
    reference = online.mlm(whole[chosen], image_global, embedding_of(online))
    torch.testing.assert_close(features.mlm_logits, reference, atol=1e-4, rtol=1e-4)
    assert 0 < parts["loss_mlm"] < 2 * math.log(len(vocab))
    embedding: Any = online.towers.text.token_embedding  # type: ignore[union-attr]
    embedding.weight.grad = None
    loss.backward()
    learned = (embedding.weight.grad.abs().sum(dim=1) > 0).nonzero()[:, 0]
    read = torch.tensor([*SPECIAL_TEXT_IDS, MASK_TOKEN_ID])
    assert torch.isin(learned, torch.cat([vocab, read])).all()
    assert torch.isin(vocab, learned).all()

    # the head alone, on detached states: exactly the vocabulary's rows
    embedding.weight.grad = None
    width, dim = online.towers.text_width, online.towers.embed_dim
    logits = online.mlm(torch.randn(5, width), torch.randn(5, dim), embedding.weight)
    logits.logsumexp(dim=1).sum().backward()
    learned = (embedding.weight.grad.abs().sum(dim=1) > 0).nonzero()[:, 0]
    assert torch.equal(learned, vocab)


def embedding_of(online: OnlineModel) -> torch.Tensor:
    return online.towers.text.token_embedding.weight  # type: ignore[union-attr,return-value]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlm-corpus") / "corpus"
    generate_corpus(out, SynthConfig(seed=3, n_images=60, n_videos=0, image_size=32), workers=1)
    return out / "images.csv"


def run_config(corpus: Path, output: Path) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": "cots-micro",
            "data": {"train": str(corpus)},
            "output": str(output),
            "batch_size": 8,
            "max_steps": 6,
            "warmup_steps": 1,
            "log_every": 1,
            "checkpoint_every": 2,
            "threads": 1,
            "objective": {
                "queue_size": 16,
                "masked": {"mlm_weight": 1.0, "mlm_vocab": "corpus"},
            },
        }
    )


def test_a_corpus_vocabulary_run_resumes_exactly(corpus: Path, tmp_path: Path) -> None:
    straight = run_config(corpus, tmp_path / "straight")
    interrupted = run_config(corpus, tmp_path / "interrupted")
    train(straight, progress=False)
    assert train(interrupted, stop_after_steps=3, progress=False).step == 3
    assert train(interrupted, progress=False).step == 6

    def logged(output: Path) -> dict[int, tuple[float, float]]:
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["loss_mlm"]) for r in rows if "loss_mlm" in r}

    expected, got = logged(tmp_path / "straight"), logged(tmp_path / "interrupted")
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pt")["model"]
    for name, tensor in a.items():
        assert torch.allclose(tensor, b[name], atol=1e-6), name
    # the vocabulary is the train split's words: a few dozen, not 49,409
    resolved = resolve_image_size(straight)
    split = load_split(resolved.data, "train", 77, preprocess=resolved.preprocess)
    assert torch.equal(a["mlm.vocab"], mlm_corpus_vocab(split.tokens))
    assert 10 < len(a["mlm.vocab"]) < 1000
    assert a["mlm.bias"].shape == a["mlm.vocab"].shape


def test_train_bench_measures_the_corpus_vocabulary_row(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = [
        "bench", "train", "--model", "cots-micro", "--batch-size", "8", "--steps", "1",
        "--warmup", "0", "--threads", "1", "--queue-size", "16",
        "--objectives", "cots+mlm,cots+mlm-corpus", "--corpus", str(corpus.parent),
        "--json-out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| cots+mlm-corpus |" in result.output
    full, words = json.loads(out.read_text())
    assert full["mlm_vocab"] is None
    assert full["tokens"] == words["tokens"] == "corpus"
    assert 10 < words["mlm_vocab"] < 1000  # the synthetic captions' words
