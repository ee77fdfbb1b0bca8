"""The model bundle contract: what ``cots export`` writes and what the runtime refuses to load.

A bundle is a directory of ONNX models, ``tokenizer.json`` and ``bundle.json``. The manifest
lists every other file with its SHA-256. The bundle id hashes that list together with every
manifest field that decides what the vectors are (preprocessing, tokenizer settings, model
config), so any change to a file or to those fields gives a new id, while the creation time,
the source path and the recorded metrics do not. Index bundles record the id of the model
bundle that made their vectors, which is how an index built by another model is refused.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.errors import BundleError
from runtime.spec import ImageSpec, TextSpec, VideoSpec

FORMAT: Final = "cots-model-bundle"
FORMAT_VERSION: Final = 1
MANIFEST: Final = "bundle.json"

Modality = Literal["image", "text", "video"]
Precision = Literal["fp32", "fp16", "int8"]
MODALITIES: Final[tuple[Modality, ...]] = ("image", "text", "video")

# The ONNX graphs' input names; every graph has one output, "embeddings" [batch, embed_dim].
INPUT_NAMES: Final[dict[Modality, str]] = {"image": "pixels", "text": "tokens", "video": "frames"}
OUTPUT_NAME: Final = "embeddings"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxInfo(_Frozen):
    opset: int
    exporter: str  # e.g. "torch 2.15.0 (torch.onnx, dynamo)"
    inputs: dict[Modality, str] = Field(default_factory=lambda: {**INPUT_NAMES})
    output: str = OUTPUT_NAME


class BundleManifest(_Frozen):
    """``bundle.json``: everything a consumer needs and nothing it must guess."""

    # "model_" fields are ours here, not pydantic's.
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format: Literal["cots-model-bundle"] = FORMAT
    format_version: int = FORMAT_VERSION
    bundle_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    created: str  # ISO 8601, UTC
    model_name: str
    model_config_: dict[str, Any] = Field(alias="model_config")  # the open_clip config
    train_config: dict[str, Any]
    embed_dim: int = Field(ge=1)
    image: ImageSpec
    text: TextSpec
    video: VideoSpec
    onnx: OnnxInfo
    # modality -> precision -> file name, e.g. {"image": {"fp32": "image.onnx", ...}}
    models: dict[Modality, dict[Precision, str]]
    tokenizer: str = "tokenizer.json"
    files: dict[str, str]  # every file but bundle.json -> SHA-256
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)  # evaluations at export
    checks: dict[str, float] = Field(default_factory=dict)  # export's parity: min cosine per case
    source: dict[str, Any] = Field(default_factory=dict)  # checkpoint path, step

    @property
    def short_id(self) -> str:
        return self.bundle_id[:12]

    def model_file(self, modality: Modality, precision: Precision) -> str:
        variants = self.models.get(modality, {})
        if precision not in variants:
            have = ", ".join(variants) or "none"
            raise BundleError(
                f"this bundle has no {precision} {modality} model (it has: {have}); "
                f"export it again with that precision"
            )
        return variants[precision]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# Manifest fields that do not change the vectors, so they stay out of the bundle id.
_NOT_HASHED: Final = frozenset({"bundle_id", "created", "metrics", "checks", "source"})


def bundle_id(fields: dict[str, Any]) -> str:
    """The content hash: SHA-256 of the canonical JSON of the manifest fields that decide the
    vectors, file hashes included."""
    hashed = {key: value for key, value in fields.items() if key not in _NOT_HASHED}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def hash_files(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` except the manifest -> SHA-256 (flat: bundles have no
    sub-folders)."""
    return {
        path.name: file_sha256(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != MANIFEST
    }


def write_manifest(directory: Path, fields: dict[str, Any]) -> BundleManifest:
    """Hash the files in ``directory`` and write ``bundle.json`` from ``fields`` (everything but
    files, bundle id and creation time)."""
    draft = BundleManifest.model_validate(
        {
            **fields,
            "files": hash_files(directory),
            "bundle_id": "0" * 64,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    # Hash the validated, JSON-normalised fields, exactly as a reader will see them.
    manifest = draft.model_copy(update={"bundle_id": bundle_id(_json_fields(draft))})
    text = manifest.model_dump_json(indent=2, by_alias=True)
    (directory / MANIFEST).write_text(text + "\n", encoding="utf-8")
    return manifest


def read_manifest(directory: Path, *, verify: bool = True) -> BundleManifest:
    """The manifest of the bundle in ``directory``, after checking that it is one this code
    understands and, with ``verify``, that every file is present and unchanged."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory} does not exist or is not a directory")
    if not path.is_file():
        raise BundleError(
            f"{directory} is not a model bundle: it has no {MANIFEST} (write one with cots export)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path} is not a COTS model bundle manifest (no format={FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format version {version!r}; this code reads version "
            f"{FORMAT_VERSION}. Export the bundle again with this version of cots, or upgrade."
        )
    try:
        manifest = BundleManifest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in error.errors()
        )
        raise BundleError(f"{path} is not a valid bundle manifest: {problems}") from None
    _check_listing(manifest, path)
    if verify:
        verify_files(directory, manifest)
    return manifest


def _check_listing(manifest: BundleManifest, path: Path) -> None:
    named = [manifest.tokenizer] + [f for v in manifest.models.values() for f in v.values()]
    unlisted = sorted(set(named) - set(manifest.files))
    if unlisted:
        raise BundleError(f"{path} names files it does not hash: {', '.join(unlisted)}")
    if bundle_id(_json_fields(manifest)) != manifest.bundle_id:
        raise BundleError(
            f"{path}: bundle_id {manifest.short_id} is not the hash of its contents; "
            f"{MANIFEST} was edited after export"
        )


def _json_fields(manifest: BundleManifest) -> dict[str, Any]:
    return json.loads(manifest.model_dump_json(by_alias=True))


def verify_files(directory: Path, manifest: BundleManifest) -> None:
    missing = sorted(name for name in manifest.files if not (directory / name).is_file())
    if missing:
        raise BundleError(f"model bundle {directory} is missing {', '.join(missing)}")
    for name, expected in manifest.files.items():
        actual = file_sha256(directory / name)
        if actual != expected:
            raise BundleError(
                f"model bundle {directory}: {name} does not match its hash in {MANIFEST} "
                f"(sha256 {actual[:12]}…, expected {expected[:12]}…); the file was changed or "
                "damaged after export"
            )
