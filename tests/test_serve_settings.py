"""``cots serve``'s process settings: thread shares per worker and the query precision."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from service.cli import _thread_shares, serve
from service.settings import Settings, setting_variables, unknown_variables


def test_workers_split_the_cores_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    monkeypatch.delenv("COTS_THREADS", raising=False)
    monkeypatch.delenv("COTS_FAISS_THREADS", raising=False)
    assert _thread_shares(1) == {}
    assert _thread_shares(4) == {"COTS_THREADS": "4", "COTS_FAISS_THREADS": "4"}
    assert _thread_shares(32) == {"COTS_THREADS": "1", "COTS_FAISS_THREADS": "1"}
    monkeypatch.setenv("COTS_THREADS", "2")
    assert _thread_shares(4) == {"COTS_FAISS_THREADS": "4"}


def test_precision_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().precision == "auto"
    monkeypatch.setenv("COTS_PRECISION", "int8")
    assert Settings().precision == "int8"
    monkeypatch.setenv("COTS_PRECISION", "int4")
    with pytest.raises(ValueError, match="precision"):
        Settings()


def test_a_misspelt_variable_is_named_with_the_setting_it_meant(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for variable in list(os.environ):
        if variable.startswith("COTS_"):
            monkeypatch.delenv(variable)
    monkeypatch.setenv("COTS_BACH__MAX_WAIT_MS", "1")  # batch, misspelt
    monkeypatch.setenv("COTS_LIMITS__MAX_K", "5")  # a real one
    monkeypatch.setenv("COTS_REDIS_SERVER", "/usr/bin/redis-server")  # the tests' own
    monkeypatch.setenv("COTS_QWERTY", "1")  # like nothing
    assert unknown_variables(os.environ) == [
        ("COTS_BACH__MAX_WAIT_MS", "COTS_BATCH__MAX_WAIT_MS"),
        ("COTS_QWERTY", None),
    ]
    # Every field is a variable the check knows, groups included.
    assert {"COTS_BUNDLE", "COTS_BATCH__MAX_WAIT_MS", "COTS_LIMITS__MAX_K"} <= set(
        setting_variables()
    )
    # cots serve says so before it starts (here it stops next: there is no bundle).
    result = CliRunner().invoke(serve, ["--bundle", str(tmp_path / "none")])
    assert result.exit_code != 0
    assert (
        "warning: COTS_BACH__MAX_WAIT_MS sets nothing and is ignored "
        "(did you mean COTS_BATCH__MAX_WAIT_MS?)" in result.output
    )
