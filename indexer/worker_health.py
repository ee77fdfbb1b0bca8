"""``python -m indexer.worker_health``: the container healthcheck of ``cots worker``.

Healthy (exit 0) when Redis answers and a worker of this host is registered there with a recent
heartbeat; RQ refreshes it while the worker waits for jobs and while a job runs. Exit 1, with the
reason on stdout, otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import UTC, datetime

from rq import Worker

from indexer.errors import JobError
from indexer.redis_updates import connect

# An idle RQ worker renews its heartbeat every worker_ttl - 15 s (405 s by default): allow one
# full cycle and a margin before calling it stale.
STALE_AFTER_S = 480.0


def check(redis_url: str, hostname: str | None = None) -> tuple[bool, str]:
    hostname = hostname or socket.gethostname()
    try:
        connection = connect(redis_url)
    except JobError as error:
        return False, str(error)
    now = datetime.now(UTC)
    mine = [worker for worker in Worker.all(connection=connection) if worker.hostname == hostname]
    if not mine:
        return False, f"no worker of host {hostname!r} is registered in Redis"
    for worker in mine:
        beat = worker.last_heartbeat
        if beat is not None:
            age = (now - beat.replace(tzinfo=beat.tzinfo or UTC)).total_seconds()
            if age <= STALE_AFTER_S:
                return True, f"{worker.name}: {worker.get_state()}, heartbeat {age:.0f} s ago"
    return False, f"the workers of host {hostname!r} have not sent a heartbeat for a while"


def main() -> None:
    redis_url = os.environ.get("COTS_REDIS_URL")
    if not redis_url:
        print("COTS_REDIS_URL is not set")
        sys.exit(1)
    healthy, detail = check(redis_url)
    print(detail)
    sys.exit(0 if healthy else 1)


if __name__ == "__main__":
    main()
