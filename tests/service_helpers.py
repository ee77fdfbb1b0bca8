"""Small helpers the service tests share."""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from service.settings import ApiKey

WRITE_KEY = "write-secret"
ADMIN_KEY = "admin-secret"
SEARCH_KEY = "search-secret"
KEYS = [
    ApiKey(name="writer", sha256=ApiKey.hash(WRITE_KEY), scopes=["write"]),
    ApiKey(name="admin", sha256=ApiKey.hash(ADMIN_KEY), scopes=["write", "admin"]),
    ApiKey(name="reader", sha256=ApiKey.hash(SEARCH_KEY), scopes=["search"]),
]


def copy_root(root: Path, into: Path) -> Path:
    """A private copy of an index root (versions and the ``current`` links)."""
    target = into / "indices"
    shutil.copytree(root, target, symlinks=True)
    return target


def corpus_images(corpus: Path) -> list[Path]:
    return sorted((corpus / "images").rglob("*.png"))


def b64(source: Path | bytes) -> str:
    data = source if isinstance(source, bytes) else source.read_bytes()
    return base64.b64encode(data).decode()


def wait_for_job(client: httpx.Client, job_id: str, key: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key}).json()
        if job["status"] in ("finished", "failed"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def wait_for_version(client: httpx.Client, name: str, version: int, timeout: float = 30) -> float:
    """Seconds until /readyz shows ``name`` at ``version``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if client.get("/readyz").json()["collections"].get(name) == version:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached version {version}")


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """``response`` is a JSON error of ``status`` whose message holds ``words``."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    error = body["error"]
    assert error["status"] == status
    assert "Traceback" not in response.text
    for word in words:
        assert word.lower() in error["message"].lower(), error["message"]
    return dict(error)
