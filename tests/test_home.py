"""One home for collections: every command's default folder, and `cots serve` finding the
bundle the collections were built with, or saying which command settles it."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from indexer.errors import CollectionError
from indexer.home import DEFAULT_INDEX_ROOT, bundle_of_collections, collection_names
from indexer.index_bundle import read_info
from indexer.versions import current_dir
from service.settings import Settings
from tests.service_helpers import copy_root


def test_every_command_defaults_to_one_folder(
    served_root: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from indexer.cli import index

    monkeypatch.delenv("COTS_INDEX_ROOT", raising=False)
    assert Settings().index_root == DEFAULT_INDEX_ROOT
    option = next(p for p in index.commands["info"].params if p.name == "root")
    assert option.default == DEFAULT_INDEX_ROOT
    # The variable moves them all.
    monkeypatch.setenv("COTS_INDEX_ROOT", str(served_root[1]))
    assert Settings().index_root == served_root[1]
    result = CliRunner().invoke(index, ["info", "--collection", "images"])
    assert result.exit_code == 0, result.output
    assert "images: live" in result.output


def test_serve_finds_the_bundle_the_collections_were_built_with(
    served_root: tuple[Path, Path], micro_bundle: Path
) -> None:
    root = served_root[1]
    assert collection_names(root) == ["captions", "images", "videos"]
    info = read_info(current_dir(root, "images"))
    assert info.model_bundle_path == str(micro_bundle.resolve())
    assert bundle_of_collections(root) == micro_bundle.resolve()
    assert bundle_of_collections(root, ["videos"]) == micro_bundle.resolve()


def test_mixed_or_missing_bundles_name_the_fix(
    served_root: tuple[Path, Path], micro_bundle: Path, tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    folder = current_dir(root, "videos")
    info = read_info(folder)
    other = tmp_path / "other-bundle"
    other.mkdir()
    info.model_copy(update={"model_bundle_path": str(other)}).write(folder)
    with pytest.raises(CollectionError, match="different model bundles") as raised:
        bundle_of_collections(root)
    assert "--collection" in str(raised.value)
    assert str(other) in str(raised.value)
    assert bundle_of_collections(root, ["images", "captions"]) == micro_bundle.resolve()
    other.rmdir()
    with pytest.raises(CollectionError, match="not there now; name it with --bundle"):
        bundle_of_collections(root, ["videos"])
    with pytest.raises(CollectionError, match="cots quickstart"):
        bundle_of_collections(tmp_path / "empty")


def test_cots_serve_without_collections_names_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli import serve

    # serve passes its settings on through the environment: restore it afterwards.
    for variable in ("COTS_INDEX_ROOT", "COTS_BUNDLE", "COTS_COLLECTIONS"):
        monkeypatch.delenv(variable, raising=False)

    result = CliRunner().invoke(serve, ["--index-root", str(tmp_path / "nothing")])
    assert result.exit_code != 0
    assert "cots quickstart FOLDER" in result.output
    assert "does not exist" in result.output
