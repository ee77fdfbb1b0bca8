"""``cots export``: a training checkpoint -> a model bundle that serving runs without torch.

The bundle holds ``image.onnx``, ``text.onnx`` and ``video.onnx`` (fp32, fp16 copies, int8 on
request), ``tokenizer.json`` and ``bundle.json`` (see ``runtime.bundle``). The export checks
itself before it publishes anything: the ONNX checker, then the bundle is loaded by the
serving runtime and its embeddings compared with the torch model's, on random inputs and on
items of the training corpus (decoded, tokenised and preprocessed by each side's own code).
The bundle is built in a temporary folder next to ``out`` and renamed into place only when
every check passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import torch
from PIL import Image
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from model.clip_tokens import PAD_ID, VOCAB_SIZE
from model.config import TrainConfig
from model.data.readers import BadItemError
from model.data.records import CorpusError
from model.errors import ModelError
from model.factory import Towers
from model.hf_tokenizer import write_tokenizer_json
from model.preprocess import to_tensor_batch
from model.tokenizer import tokenize
from model.video import TemporalPooling
from runtime.bundle import (
    INPUT_NAMES,
    MODALITIES,
    OUTPUT_NAME,
    Modality,
    Precision,
    write_manifest,
)
from runtime.encoder import Encoder
from runtime.errors import BundleError, VideoDecodeError
from runtime.spec import ImageSpec, TextSpec, VideoSpec
from runtime.text import TextTokenizer
from runtime.video import load_video
from runtime.video_decode import read_video
from training.eval_splits import towers_from_checkpoint
from training.training_data import csv_reader
from training.video_data import video_csv_reader

logger = logging.getLogger("cots.export")

DEFAULT_OPSET: Final = 18
# Minimum cosine similarity between ORT and torch embeddings, per precision. int8 changes the
# numbers by design; its gate is retrieval quality (cots bench encode), so it is only recorded.
MIN_COSINE: Final[dict[Precision, float]] = {"fp32": 0.9999, "fp16": 0.999}
MAX_BATCH: Final = 65_536
_EXTERNAL_DATA_BYTES: Final = 1_800_000_000  # protobuf's 2 GB limit, with headroom
_PAD_TOKENS: Final = ("<pad>", "[PAD]", "<|endoftext|>")


class ExportError(ModelError):
    """The export failed a check; nothing was written to the bundle folder."""


@dataclass(frozen=True)
class ExportOptions:
    opset: int = DEFAULT_OPSET
    fp16: bool = True
    int8: bool = False
    corpus: Path | None = None  # default: the corpus the checkpoint was trained on
    check_items: int = 32  # corpus items per parity check
    overwrite: bool = False
    progress: bool = True


class _Embedder(nn.Module):
    """One modality of the towers as a graph with one input and one L2-normalised output."""

    def __init__(self, towers: Towers, modality: Modality) -> None:
        super().__init__()
        self.towers = towers
        self.modality = modality

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.modality == "text":
            return self.towers.encode_text(inputs)
        return self.towers.encode_image(inputs)  # images [B, 3, S, S] or videos [B, T, 3, S, S]


def export_bundle(checkpoint: Path, out: Path, options: ExportOptions | None = None) -> Path:
    """Export ``checkpoint`` to the bundle folder ``out``; returns ``out``."""
    towers, config, state = towers_from_checkpoint(checkpoint)
    source = _Source(
        context_length=int(state["context_length"]),
        open_clip_config=state.get("model_config", {}),
        train_config=state["train_config"],
        metrics=state.get("evals", {}),
        origin={"checkpoint": str(checkpoint), "step": int(state["step"])},
    )
    return _export(towers, config, source, out, options or ExportOptions())


def export_pretrained(
    name: str,
    pretrained: str,
    out: Path,
    options: ExportOptions | None = None,
    tokenizer: Path | None = None,
) -> Path:
    """Export open_clip model ``name`` with the weights ``pretrained`` (a tag or a local file)
    to the bundle folder ``out``, untrained (zero-shot); returns ``out``. ``tokenizer``: a
    tokenizer.json for models whose tokenizer is not open_clip's BPE."""
    from training.zero_shot import pretrained_model

    options = options or ExportOptions()
    if Path(out).exists() and not options.overwrite:
        raise ExportError(f"{out} exists; pass --force to replace it")
    model = pretrained_model(name, pretrained, tokenizer, options.corpus)
    source = _Source(
        context_length=model.context_length,
        open_clip_config=model.open_clip_config,
        train_config=model.config.model_dump(mode="json"),
        metrics={},
        origin={"pretrained": pretrained, "zero_shot": True},
        tokenizer=model.tokenizer,
        corpus_check=options.corpus is not None,
    )
    return _export(model.towers, model.config, source, out, options)


@dataclass(frozen=True)
class _Source:
    """What the bundle records about where its towers came from."""

    context_length: int
    open_clip_config: dict[str, Any]
    train_config: dict[str, Any]
    metrics: dict[str, Any]
    origin: dict[str, Any]  # bundle.json's "source"
    tokenizer: Path | None = None  # a tokenizer.json to ship as is; None: open_clip's BPE
    corpus_check: bool = True  # compare on corpus items too (a checkpoint always has its CSV)


def _export(
    towers: Towers, config: TrainConfig, source: _Source, out: Path, options: ExportOptions
) -> Path:
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise ExportError(f"{out} exists; pass --force to replace it")
    _add_video_pooling(towers, config)
    specs = _specs(towers, config, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        with torch.no_grad():
            models = _write_models(work, towers, specs, config.model, options, source.tokenizer)
            fields = {
                "model_name": config.model,
                "model_config": source.open_clip_config,
                "train_config": source.train_config,
                "embed_dim": towers.embed_dim,
                **specs.dump(),
                "onnx": {"opset": options.opset, "exporter": f"torch {torch.__version__} (dynamo)"},
                "models": models,
                "metrics": source.metrics,
                "source": source.origin,
            }
            # The runtime loads the bundle through its manifest, so write it before the checks
            # and again with their results (the files, and so the bundle id, stay the same).
            write_manifest(work, fields)
            checks = _check_bundle(work, towers, specs, config, options, source)
        write_manifest(work, {**fields, "checks": checks})
        _publish(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _add_video_pooling(towers: Towers, config: TrainConfig) -> None:
    """A model trained on images embeds videos as the mean of its frame features, so every
    bundle can serve text-to-video search; a video model keeps its temporal pooling."""
    if towers.temporal is None:
        towers.temporal = TemporalPooling(towers.embed_dim, config.video.frames, "mean")


@dataclass(frozen=True)
class Specs:
    """The preprocessing parts of bundle.json."""

    image: ImageSpec
    text: TextSpec
    video: VideoSpec
    vocab: int = VOCAB_SIZE  # token ids the random parity inputs draw from (not in bundle.json)

    def dump(self) -> dict[str, Any]:
        return {
            "image": self.image.model_dump(),
            "text": self.text.model_dump(),
            "video": self.video.model_dump(),
        }


def _specs(towers: Towers, config: TrainConfig, source: _Source) -> Specs:
    pre = config.preprocess
    if pre.image_size is None:
        raise ExportError("the checkpoint's preprocess.image_size is unset")
    if towers.temporal is None:
        raise ExportError("the towers have no video pooling; add it before exporting")
    return Specs(
        image=ImageSpec(
            size=pre.image_size,
            resize_mode=pre.resize_mode,
            interpolation=pre.interpolation,
            mean=pre.mean,
            std=pre.std,
        ),
        text=TextSpec(
            context_length=source.context_length,
            pad_id=_pad_id(source.tokenizer),
            trim_padding=towers.trims_padding,
        ),
        vocab=_vocab(towers, source.tokenizer),
        video=VideoSpec(
            frames=towers.temporal.frames,
            decode_frames=config.video.decode_frames,
            pooling=towers.temporal.kind,
        ),
    )


def _vocab(towers: Towers, tokenizer: Path | None) -> int:
    """Ids the text tower embeds and its tokenizer makes: open_clip's BPE (49,408; our configs
    have one more row, the [MASK] id, which no tokenizer produces) or the shipped file's."""
    embedding: Any = towers.text.token_embedding
    rows = int(embedding.num_embeddings)
    if tokenizer is None:
        return min(rows, VOCAB_SIZE)
    return min(rows, _load_tokenizer(tokenizer).get_vocab_size())


def _pad_id(tokenizer: Path | None) -> int:
    """The padding id: open_clip's BPE pads with 0; a shipped tokenizer.json says its own."""
    if tokenizer is None:
        return PAD_ID
    loaded = _load_tokenizer(tokenizer)
    padding = loaded.padding
    if padding is not None:
        return int(padding["pad_id"])
    ids = (loaded.token_to_id(token) for token in _PAD_TOKENS)
    return next((int(i) for i in ids if i is not None), PAD_ID)


def _load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for unreadable files
        raise ExportError(f"{path} is not a valid tokenizer.json: {error}") from None


def _write_tokenizer(target: Path, text: TextSpec, tokenizer: Path | None) -> None:
    """open_clip's BPE as tokenizer.json, or the given file, cut to the context length (the
    runtime checks that the file truncates where the text model ends)."""
    if tokenizer is None:
        write_tokenizer_json(target, text.context_length)
        return
    loaded = _load_tokenizer(tokenizer)
    loaded.enable_truncation(text.context_length)
    loaded.save(str(target))


def _precisions(options: ExportOptions) -> list[Precision]:
    wanted: dict[Precision, bool] = {"fp32": True, "fp16": options.fp16, "int8": options.int8}
    return [precision for precision, on in wanted.items() if on]


def _write_models(
    work: Path,
    towers: Towers,
    specs: Specs,
    model_name: str,
    options: ExportOptions,
    tokenizer: Path | None,
) -> dict[Modality, dict[Precision, str]]:
    """The ONNX models of every modality and precision, and tokenizer.json."""
    precisions = _precisions(options)
    models: dict[Modality, dict[Precision, str]] = {}
    steps = tqdm(
        total=3 * len(precisions) + 1, desc="export", unit="step", disable=not options.progress
    )
    with steps:
        for modality in MODALITIES:
            steps.set_postfix_str(f"{modality} fp32")
            fp32 = work / f"{modality}.onnx"
            _export_onnx(towers, modality, fp32, specs, model_name, options.opset)
            models[modality] = {"fp32": fp32.name}
            steps.update()
            for precision in precisions[1:]:
                steps.set_postfix_str(f"{modality} {precision}")
                target = work / f"{modality}.{precision}.onnx"
                _convert(fp32, target, precision)
                models[modality][precision] = target.name
                steps.update()
        steps.set_postfix_str("tokenizer")
        _write_tokenizer(work / "tokenizer.json", specs.text, tokenizer)
        steps.update()
    return models


def _export_onnx(
    towers: Towers, modality: Modality, path: Path, specs: Specs, model_name: str, opset: int
) -> None:
    example, dims = _example_input(modality, specs)
    module = _Embedder(towers, modality).eval()
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAMES[modality]],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=(dims,),
            opset_version=opset,
            external_data=size > _EXTERNAL_DATA_BYTES,
            verbose=False,
        )
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        raise ExportError(
            f"exporting the {modality} model of {model_name} failed: {error}"
        ) from error


def _example_input(modality: Modality, specs: Specs) -> tuple[torch.Tensor, dict[int, Any]]:
    """An input to trace with, and its dynamic axes: the batch, and for a text tower that reads
    the end-of-text token, the length (2 = start and end of text, up to the context length)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    size = specs.image.size
    if modality == "image":
        return torch.randn(2, 3, size, size), {0: batch}
    if modality == "video":
        return torch.randn(2, specs.video.frames, 3, size, size), {0: batch}
    context = specs.text.context_length
    if not specs.text.trim_padding:
        return _random_tokens(torch.Generator().manual_seed(0), 2, context, specs.vocab), {0: batch}
    length = torch.export.Dim("length", min=2, max=context)
    tokens = _random_tokens(torch.Generator().manual_seed(0), 2, context - 1, specs.vocab)
    return tokens, {0: batch, 1: length}


def _random_tokens(
    generator: torch.Generator, batch: int, length: int, vocab: int = VOCAB_SIZE
) -> torch.Tensor:
    """[batch, length] ids as open_clip's BPE makes them (start, BPE ids, end of text, zero
    padding; start and end are the last two ids), with the first row ending exactly at
    ``length``. Other vocabularies get the same shape of ids from their own range."""
    start, end = vocab - 2, vocab - 1
    tokens = torch.randint(1, start, (batch, length), generator=generator)
    tokens[:, 0] = start
    ends = torch.randint(1, length, (batch,), generator=generator)
    ends[0] = length - 1
    tokens[torch.arange(length) > ends[:, None]] = 0
    tokens[torch.arange(batch), ends] = end
    return tokens


def _convert(fp32: Path, target: Path, precision: Precision) -> None:
    if precision == "fp16":
        import onnx_ir
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # Inputs and outputs stay float32, so callers feed one dtype whatever the precision.
        half = onnx_ir.from_proto(
            convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
        )
        # The converter appends its output casts after their consumers; ONNX requires
        # topological order (ONNX Runtime tolerates it, the checker and other runtimes do not).
        half.graph.sort()
        onnx.save(onnx_ir.to_proto(half), str(target))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # The quantiser re-runs ONNX shape inference, which rejects some of the exporter's
        # intermediate shape annotations (temporal pooling's flatten); without them it infers
        # every shape itself.
        model = onnx.load(str(fp32))
        del model.graph.value_info[:]
        with tempfile.TemporaryDirectory() as scratch:
            bare = Path(scratch) / fp32.name
            onnx.save(model, str(bare))
            quantize_dynamic(str(bare), str(target), weight_type=QuantType.QInt8)
    else:
        raise ValueError(precision)
    onnx.checker.check_model(str(target))


# Checks -----------------------------------------------------------------------------------------


def _check_bundle(
    work: Path,
    towers: Towers,
    specs: Specs,
    config: TrainConfig,
    options: ExportOptions,
    source: _Source,
) -> dict[str, float]:
    """Min cosine ORT vs torch per (precision, case); raises ExportError below the bounds."""
    cases = _random_cases(towers, specs)
    if source.corpus_check:
        cases += _corpus_cases(towers, specs, config, options, work / "tokenizer.json", source)
    checks: dict[str, float] = {}
    failures = []
    for precision in tqdm(_precisions(options), desc="parity", disable=not options.progress):
        try:
            encoder = Encoder(work, providers=["cpu"], precision=precision, verify=False)
        except BundleError as error:
            raise ExportError(f"the runtime cannot load the new bundle: {error}") from error
        for case in cases:
            cosine = float(np.min(np.sum(case.runtime(encoder) * case.expected, axis=1)))
            checks[f"{precision}/{case.name}"] = round(cosine, 7)
            bound = MIN_COSINE.get(precision)
            if bound is not None and not cosine >= bound:
                failures.append(f"{precision} {case.name}: min cosine {cosine:.6f} < {bound}")
    if failures:
        raise ExportError("ONNX Runtime does not reproduce the torch model: " + "; ".join(failures))
    return checks


@dataclass(frozen=True)
class _Case:
    name: str
    expected: np.ndarray  # the torch model's embeddings [N, D]
    runtime: Callable[[Encoder], np.ndarray]  # the bundle's, through the serving runtime


def _random_cases(towers: Towers, specs: Specs) -> list[_Case]:
    generator = torch.Generator().manual_seed(1234)
    size, context = specs.image.size, specs.text.context_length
    pixels = torch.randn(5, 3, size, size, generator=generator)
    videos = torch.randn(2, specs.video.frames, 3, size, size, generator=generator)
    # Texts padded to the context length as training pads them; the runtime gets the batch cut
    # to its longest text, which shows that trimming the padding changes nothing.
    short = _random_tokens(generator, 7, context // 2, specs.vocab)
    padded = nn.functional.pad(short, (0, context - short.shape[1]))
    full = _random_tokens(generator, 3, context, specs.vocab)
    return [
        _Case("image/random", _np(towers.encode_image(pixels)), _run("image", pixels)),
        _Case(
            "text/random",
            _np(towers.encode_text(padded)),
            _run("text", short if specs.text.trim_padding else padded),
        ),
        _Case("text/random-full", _np(towers.encode_text(full)), _run("text", full)),
        _Case("video/random", _np(towers.encode_image(videos)), _run("video", videos)),
    ]


def _corpus_cases(
    towers: Towers,
    specs: Specs,
    config: TrainConfig,
    options: ExportOptions,
    tokenizer_json: Path,
    source: _Source,
) -> list[_Case]:
    """Real items through each side's own pipeline: the training transform and tokenizer for
    torch; the runtime's preprocessing and tokenizer.json for ORT. A shipped tokenizer.json is
    the only tokenizer there is, so then both sides tokenise with it."""
    corpus = Path(options.corpus or config.data.train)
    if not corpus.is_file():
        raise ExportError(
            f"corpus {corpus} (for the parity check on real items) is missing; "
            "pass --corpus with a CSV of the same kind"
        )
    data = config.data.model_copy(update={"train": corpus})
    try:
        if data.modality == "video":
            listed = video_csv_reader(data, None, 1).records()
            videos = list(itertools.islice(listed, options.check_items))
            captions = [r.captions[0] for r in videos]
            images = [_first_frame(r.path) for r in videos]
        else:
            samples = list(itertools.islice(csv_reader(data, None).samples(), options.check_items))
            captions = [s.captions[0] for s in samples]
            images = [s.image for s in samples]
            videos = []
    except (CorpusError, BadItemError, VideoDecodeError) as error:
        raise ExportError(f"cannot read corpus {corpus} for the parity check: {error}") from None
    if not captions:
        raise ExportError(f"corpus {corpus} has no usable items for the parity check")
    if source.tokenizer is None:
        tokens = tokenize(captions, specs.text.context_length)
    else:
        tokens = torch.from_numpy(TextTokenizer.from_file(tokenizer_json, specs.text)(captions))
    cases = [
        _Case(
            "image/corpus",
            _np(towers.encode_image(to_tensor_batch(images, config.preprocess))),
            lambda encoder: encoder.encode_images(images),
        ),
        _Case(
            "text/corpus",
            _np(towers.encode_text(tokens)),
            lambda encoder: encoder.encode_texts(captions),
        ),
    ]
    if videos:
        # Both sides get the runtime's decoded frames: frame sampling is compared with training
        # in tests/test_preprocess_parity.py; this case checks the video graph on real frames.
        frames = np.stack([load_video(r.path, specs.video, specs.image) for r in videos])
        expected = _np(towers.encode_image(torch.from_numpy(frames)))
        cases.append(_Case("video/corpus", expected, lambda encoder: encoder.run("video", frames)))
    return cases


def _first_frame(path: Path) -> Image.Image:
    frames, _, _ = read_video(path, 1)
    return Image.fromarray(frames[0])


def _run(modality: Modality, inputs: torch.Tensor) -> Callable[[Encoder], np.ndarray]:
    array = inputs.numpy()
    return lambda encoder: encoder.run(modality, array)


def _np(embeddings: torch.Tensor) -> np.ndarray:
    return embeddings.float().numpy()


def _publish(work: Path, out: Path) -> None:
    """Move the finished bundle to ``out``, replacing an old one only after the new one is
    complete (the old one is moved aside first, then deleted)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    work.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
