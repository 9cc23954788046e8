"""The fenced leader on real servers: the leader master is paused (SIGSTOP) past its
lease, another master takes over, and once resumed (SIGCONT) the old leader does
nothing destructive and steps down.

What only the old leader would do: retention. The old leader sweeps retention every
0.3 s, the new one every hour (so not within this test): documents due for deletion
put in while the old leader is paused are deleted by nobody, unless the old leader,
resumed, acts on a leadership it no longer holds."""

from __future__ import annotations

import signal
import time
from datetime import timedelta

import pytest

from sendscript.dev.embedded import EmbeddedServers
from sendscript.models import utcnow
from sendscript.settings import Settings
from tests.support import Inspect, Roles, unique_settings, wait_for

pytestmark = pytest.mark.e2e

LEASE_S = 2.0
FAST = {"leader_lease_s": LEASE_S, "sweep_interval_s": 0.3, "heartbeat_ttl_s": 2.0,
        "workers": 1, "counts_interval_s": 0.5}


@pytest.fixture
def settings(servers: EmbeddedServers) -> Settings:
    return unique_settings(servers, **FAST)


def holder(inspect: Inspect, settings: Settings) -> str:
    value = inspect.redis.get(f"{settings.keys.prefix}:leader")
    return value.decode().rsplit("#", 1)[0] if value else ""


def test_a_paused_leader_resumes_without_acting_and_steps_down(
    settings: Settings, roles: Roles, inspect: Inspect,
) -> None:
    a_id, b_id = settings.master_id + "-a", settings.master_id + "-b"
    roles.simulator(run_ms=20, progress=False)
    a = roles.master("master-a", master_id=a_id, retention_sweep_s=0.3)
    wait_for(lambda: holder(inspect, settings) == a_id, 10, "master a to lead")
    b = roles.master("master-b", master_id=b_id, retention_sweep_s=3600)
    assert holder(inspect, settings) == a_id
    token_a = int(inspect.redis.get(f"{settings.keys.prefix}:leader").decode().rsplit("#")[1])

    a.signal(signal.SIGSTOP)
    try:
        wait_for(lambda: holder(inspect, settings) == b_id, 10, "master b to take over")
        due = utcnow() - timedelta(minutes=5)
        inspect.db.script_tasks.insert_many(
            # finished long ago: due whatever the retention is
            [{"_id": f"due-{i}", "status": "success", "purge_at": due,
              "updated_at": due - timedelta(days=400)} for i in range(20)])
        seen = a.log_path.stat().st_size if a.log_path else 0
    finally:
        a.signal(signal.SIGCONT)

    def after_resume() -> str:
        if a.log_path is None:
            return ""
        with open(a.log_path, "rb") as f:
            f.seek(seen)
            return f.read().decode(errors="replace")

    wait_for(lambda: "stepped down from leadership" in after_resume(), 10,
             "master a to step down")
    # Time for every loop of a's to have run a few times since it resumed.
    wait_for(lambda: (roles.master_info(a_id) or {}).get("sweeps") is not None
             and (roles.master_info(a_id) or {}).get("leader") is False, 10,
             "master a to report it does not lead")
    # A negative check needs a window: a's retention runs every 0.3 s, so this is
    # several of its sweeps (each would delete the due documents if it still led).
    time.sleep(2.0)
    log = after_resume()
    assert inspect.db.script_tasks.count_documents({"purge_at": due}) == 20, log
    assert "retention deleted" not in log and "requeued" not in log, log
    value = inspect.redis.get(f"{settings.keys.prefix}:leader").decode()
    assert value.startswith(f"{b_id}#") and int(value.rsplit("#")[1]) > token_a
    assert a.running and b.running
