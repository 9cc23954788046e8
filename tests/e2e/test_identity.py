"""One live master per master_id: a second one under the same id exits 2 with the
reason; one restarted after a SIGKILL of the first takes the id once its claim lapses."""

from __future__ import annotations

import subprocess
import sys

import redis

from sendscript import connect
from sendscript.settings import Settings
from tests.support import Roles, settings_env

CENTRAL = "http://127.0.0.1:9"  # never called: no task is submitted here


def claim_token(settings: Settings) -> bytes | None:
    client: redis.Redis = connect.redis_sync(settings)
    try:
        return client.get(settings.keys.master_claim(settings.master_id))
    finally:
        client.close()


def test_a_second_master_under_a_live_id_exits_2(roles: Roles, settings: Settings) -> None:
    first = roles.master(workers=1, central_url=CENTRAL)
    held = claim_token(settings)
    assert held is not None
    second = subprocess.run(
        [sys.executable, "-m", "sendscript", "master"],
        env=settings_env(settings, workers=1, central_url=CENTRAL),
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr[-2000:]
    assert "is in use by a live master" in second.stderr
    assert first.running and claim_token(settings) == held


def test_a_restart_after_sigkill_takes_the_id(roles: Roles, settings: Settings) -> None:
    first = roles.master(workers=1, central_url=CENTRAL)
    held = claim_token(settings)
    first.kill()
    assert claim_token(settings) == held, "a SIGKILLed master leaves its claim behind"
    roles.master(name="restarted", workers=1, central_url=CENTRAL)  # waits for its workers
    assert claim_token(settings) not in (None, held)
