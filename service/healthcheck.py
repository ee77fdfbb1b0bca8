"""``python -m service.healthcheck``: the container healthcheck of the API.

Exits 0 when ``/readyz`` answers 200 (the bundle and every collection are loaded; a Redis outage
still counts, search works without it), 1 otherwise. Standard library only, so it starts fast
and needs no curl in the image. ``COTS_HEALTHCHECK_URL`` overrides the address.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/readyz"


def check(url: str, timeout_s: float = 4.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, f"{response.status} {response.read(300).decode()}"
    except urllib.error.HTTPError as error:
        return False, f"{error.code} {error.read(300).decode(errors='replace')}"
    except (OSError, ValueError) as error:
        return False, f"{url}: {error}"


def main() -> None:
    healthy, detail = check(os.environ.get("COTS_HEALTHCHECK_URL", DEFAULT_URL))
    print(detail)
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
