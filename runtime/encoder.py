"""The torch-free encoder runtime: a model bundle in, L2-normalised float32 embeddings out.

One implementation for the indexer and the service: tokenising (``tokenizers``), image and
video preprocessing (NumPy, Pillow, PyAV) and ONNX Runtime sessions, created once per modality
on first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import onnxruntime as ort
from PIL import Image

from runtime.bundle import (
    INPUT_NAMES,
    BundleManifest,
    Modality,
    Precision,
    read_manifest,
)
from runtime.errors import BundleError
from runtime.images import load_image, preprocess_images
from runtime.text import TextTokenizer, check_texts
from runtime.video import load_video

logger = logging.getLogger("cots.encoder")

# The accelerators we pick by default, best first. TensorRT is used only when asked for: it
# builds an engine per input shape on first use, minutes of start-up a default should not cost.
_DEFAULT_ACCELERATORS: Final = ("CUDAExecutionProvider",)
_PROVIDER_ALIASES: Final = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_GPU_PROVIDERS: Final = {"CUDAExecutionProvider", "TensorrtExecutionProvider"}

ImageInput = Image.Image | bytes | Path
PrecisionChoice = Literal["auto", "fp32", "fp16", "int8"]


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime providers to use, best first, always ending with the CPU.

    ``requested``: names or aliases (cpu, cuda, tensorrt); each must be available in this
    onnxruntime build. Default: CUDA when this build has it, else the CPU.
    """
    available = ort.get_available_providers()
    if requested:
        chosen = [_PROVIDER_ALIASES.get(name.lower(), name) for name in requested]
        unknown = [name for name in chosen if name not in available]
        if unknown:
            raise BundleError(
                f"onnxruntime providers {', '.join(unknown)} are not available in this "
                f"install (available: {', '.join(available)})"
            )
    else:
        chosen = [name for name in _DEFAULT_ACCELERATORS if name in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class Encoder:
    """Embeds texts, images and videos with a model bundle.

    ``precision``: ``auto`` runs the fp16 models on a GPU provider and fp32 on the CPU.
    ``threads``: ONNX Runtime's intra-op threads (None: its default, all cores).
    ``batch_size``: inputs per model call; larger inputs lists are split.
    ``max_pixels``: images with more pixels are refused before they are decoded.
    ``spin``: ONNX Runtime's threads spin between calls (lower latency for back-to-back
    batches, as in indexing); a server with idle gaps and other work on its cores turns it off.
    """

    def __init__(
        self,
        bundle: Path | str,
        *,
        providers: Sequence[str] | None = None,
        precision: PrecisionChoice = "auto",
        threads: int | None = None,
        batch_size: int = 64,
        max_pixels: int | None = None,
        verify: bool = True,
        spin: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.path = Path(bundle)
        self.manifest: BundleManifest = read_manifest(self.path, verify=verify)
        self.providers = choose_providers(providers)
        self._precision_choice = precision
        self.precision: Precision = _resolve_precision(precision, self.providers)
        for modality in self.manifest.models:  # refuse a missing precision now, not mid-job
            self.manifest.model_file(modality, self.precision)
        self.threads = threads
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.spin = spin
        self.tokenizer = TextTokenizer.from_file(
            self.path / self.manifest.tokenizer, self.manifest.text
        )
        self._sessions: dict[Modality, ort.InferenceSession] = {}
        self._lock = threading.Lock()

    @property
    def bundle_id(self) -> str:
        return self.manifest.bundle_id

    @property
    def dim(self) -> int:
        return self.manifest.embed_dim

    def session(self, modality: Modality) -> ort.InferenceSession:
        """The ONNX Runtime session of one modality, created on first use."""
        with self._lock:
            if modality not in self._sessions:
                self._sessions[modality] = self._create_session(modality)
            return self._sessions[modality]

    def _create_session(self, modality: Modality) -> ort.InferenceSession:
        session = self._load_session(modality)
        wanted_gpu = self.providers[0] in _GPU_PROVIDERS
        if wanted_gpu and not _GPU_PROVIDERS.intersection(session.get_providers()):
            # onnxruntime-gpu lists CUDA whenever it is installed, and falls back to the CPU
            # when the GPU or its libraries are missing (a GPU image started without --gpus).
            # Follow it all the way, fp32 models included: fp16 graphs are slow on the CPU.
            logger.warning(
                "%s is unusable here (no GPU, or its libraries are missing): running on the CPU",
                self.providers[0],
            )
            self.providers = ["CPUExecutionProvider"]
            self.precision = _resolve_precision(self._precision_choice, self.providers)
            session = self._load_session(modality)
        return session

    def _load_session(self, modality: Modality) -> ort.InferenceSession:
        name = self.manifest.model_file(modality, self.precision)
        options = ort.SessionOptions()
        # Level "all" adds the CPU's layout optimisations; on fp16 graphs they crash
        # onnxruntime 1.31 (segfault creating the video session), and fp16 is for GPUs anyway.
        level = "ORT_ENABLE_EXTENDED" if self.precision == "fp16" else "ORT_ENABLE_ALL"
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        if not self.spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                str(self.path / name), sess_options=options, providers=self.providers
            )
        except Exception as error:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BundleError(f"cannot load {self.path / name}: {error}") from None
        logger.info("loaded %s on %s", name, ", ".join(session.get_providers()))
        return session

    # Encoding ----------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] float32 embeddings of ``texts``. Long lists are cut into batches of similar
        length, so short queries are not padded to a long neighbour."""
        check_texts(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = self._encode_batches("text", [texts[i] for i in order], self.tokenizer)
        result = np.empty_like(out)
        result[order] = out
        return result

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[N, D] embeddings of images given as PIL images, encoded bytes or file paths."""

        def prepare(batch: Sequence[ImageInput]) -> np.ndarray:
            limit = self.max_pixels
            decoded = [
                item if isinstance(item, Image.Image) else load_image(item, max_pixels=limit)
                for item in batch
            ]
            return preprocess_images(decoded, self.manifest.image)

        return self._encode_batches("image", images, prepare)

    def encode_videos(self, paths: Sequence[Path | str]) -> np.ndarray:
        """[N, D] embeddings of video files (frames sampled as ``bundle.json`` says)."""

        def prepare(batch: Sequence[Path | str]) -> np.ndarray:
            video, image = self.manifest.video, self.manifest.image
            return np.stack([load_video(Path(path), video, image) for path in batch])

        return self._encode_batches("video", paths, prepare)

    def run(self, modality: Modality, inputs: np.ndarray) -> np.ndarray:
        """One model call on prepared inputs (pixels, token ids or frames) -> [B, D]."""
        session = self.session(modality)
        (output,) = session.run(None, {INPUT_NAMES[modality]: inputs})
        return _normalise(output)

    def _encode_batches(
        self, modality: Modality, items: Sequence[Any], prepare: Callable[[Any], np.ndarray]
    ) -> np.ndarray:
        out = np.empty((len(items), self.dim), dtype=np.float32)
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            out[start : start + len(batch)] = self.run(modality, prepare(batch))
        return out


def _resolve_precision(precision: PrecisionChoice, providers: list[str]) -> Precision:
    if precision != "auto":
        return precision
    return "fp16" if providers[0] in _GPU_PROVIDERS else "fp32"


def _normalise(embeddings: np.ndarray) -> np.ndarray:
    # The graphs normalise already; fp16 graphs leave norms off by ~1e-3, so do it in float32.
    embeddings = embeddings.astype(np.float32, copy=False)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, 1e-12)
