"""A master that cannot reach a server still stops on SIGTERM within its grace period
(supervisorctl stop must not hang for its whole stopwaitsecs)."""

from __future__ import annotations

import signal
import time

import pytest

from sendscript.dev.embedded import free_port
from sendscript.settings import Settings
from tests.support import Roles, wait_for

GRACE_S = 4.0
pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("server", ["mongo", "redis"])
def test_master_stops_on_sigterm_while_a_server_is_unreachable(
    settings: Settings, roles: Roles, server: str
) -> None:
    closed = free_port()  # nothing listens there
    url = (f"mongodb://127.0.0.1:{closed}/x" if server == "mongo"
           else f"redis://127.0.0.1:{closed}/0")
    roles.central_url = "http://127.0.0.1:9"  # never called: nothing gets that far
    proc = roles._start("master", ["master"], **{f"{server}_url": url},
                        shutdown_grace_s=GRACE_S, mongo_timeout_s=1, redis_timeout_s=1)
    # The outage is logged once, when the master first fails to reach the server.
    wait_for(lambda: "retrying with backoff" in proc.log_tail(200), 60,
             f"the master to report {server} unreachable")
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    code = proc.wait(GRACE_S + 10)
    took = time.monotonic() - started
    assert code is not None, f"master still running {took:.0f}s after SIGTERM:\n" \
                             f"{proc.log_tail(60)}"
    assert code == 0, proc.log_tail(60)
    assert "stopping (SIGTERM)" in proc.log_tail(200)
