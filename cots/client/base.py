"""What the sync and async clients share: settings, headers, and turning an answer into a
model or a typed error."""

from __future__ import annotations

from typing import Final

import httpx

from cots import __version__
from cots.client.calls import Call, Model
from cots.client.errors import error_from

DEFAULT_URL: Final = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S: Final = 60.0


def client_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"cots-search-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    return headers


def parse(call: Call[Model], response: httpx.Response) -> Model:
    """The answer as ``call.model``; raises the typed error of an error status."""
    if response.is_success or response.status_code in call.ok_statuses:
        return call.model.model_validate_json(response.content)
    raise error_from(response)


def request_options(call: Call[Model]) -> dict[str, object]:
    options: dict[str, object] = {}
    if call.json is not None:
        options["json"] = call.json
    if call.data is not None:
        options["data"] = call.data
    if call.files:
        options["files"] = call.files
    return options


def normalise_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the server URL must start with http:// or https://, not {url!r}")
    return url.rstrip("/")
