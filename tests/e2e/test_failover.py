"""The whole service on a Sentinel-watched Redis (master, replica, Sentinel) with
SENDSCRIPT_REDIS_MIN_REPLICAS=1: the Redis master is SIGKILLed mid-run while a
producer keeps submitting, the Sentinel promotes the replica, and the farm's side
shows no device asked to run two scripts at once, no task lost, every task finished
and none sent more often than its attempts allow.

The promoted replica has no replica of its own until the dead node comes back as
one: meanwhile no lock can be confirmed, so nothing is sent (tasks wait, using no
attempt); the node is then restarted as its replica, as an operator (or Sentinel,
when the old master returns) does, and the work goes on."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers
from sendscript.dev.topologies import SentinelGroup
from sendscript.replicas import NotReplicated
from tests.support import Inspect, Roles, unique_settings, wait_for

pytestmark = pytest.mark.e2e

DEVICES = 12
BATCH = 10

FAST = {
    "heartbeat_ttl_s": 6.0, "sweep_interval_s": 0.5, "leader_lease_s": 3.0,
    "orphan_grace_s": 2.0, "free_check_interval_s": 1.0, "running_stuck_s": 3.0,
    "retry_base_s": 0.3, "retry_cap_s": 2.0, "retry_jitter": 0.0,
    "redis_timeout_s": 1.5, "orphan_lock_grace_s": 2.0,
    "redis_min_replicas": 1, "redis_wait_timeout_ms": 500,
}


class Producer(threading.Thread):
    """Submits batches until stopped, each batch again on any error: its dedupe keys
    make a batch submitted twice one set of tasks."""

    def __init__(self, client: SendScriptClient) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.ids: set[str] = set()
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            specs = [{"device_id": f"fo-{(n + k) % DEVICES}", "script": {"id": "a"},
                      "dedupe_key": f"fo-{n + k}"} for k in range(BATCH)]
            try:
                self.ids.update(s.task_id for s in self.client.submit_many(specs))
            except NotReplicated as exc:  # stored and pushed: not to be submitted again
                self.errors["not_replicated"] += 1
                self.ids.update(exc.task_ids)
            except Exception as exc:  # Redis away during the failover: the same again
                self.errors[type(exc).__name__] += 1
                time.sleep(0.1)
                continue
            n += BATCH
            time.sleep(0.05)


def test_a_sentinel_failover_under_load_loses_nothing_and_overlaps_nothing(
        servers: EmbeddedServers, tmp_path: Path) -> None:
    with SentinelGroup(tmp_path / "sentinel", down_after_ms=1000) as group:
        settings = unique_settings(servers, redis_url=group.url, **FAST)
        roles = Roles(settings, tmp_path / "logs")
        view = Inspect(settings)
        client = SendScriptClient(settings)
        producer = Producer(client)
        try:
            roles.simulator(run_ms=100, progress=False)
            roles.consumer()
            roles.master()
            producer.start()
            wait_for(lambda: view.count("success") >= 60, 60, "progress before the kill")
            group.kill_master()
            killed_at = time.monotonic()
            group.wait_failover()
            failover_s = time.monotonic() - killed_at
            time.sleep(1.0)  # sends whose locks were confirmed before the kill land
            accepted = roles.farm()["accepted"]
            time.sleep(2.0)
            assert roles.farm()["accepted"] == accepted, "sent without a replica's copy"
            group.master.extra = ["--replicaof", "127.0.0.1", str(group.replica.port)]
            group.master.start()
            submitted = len(producer.ids)
            wait_for(lambda: len(producer.ids) >= submitted + 100, 60,
                     "submissions after the failover", 0.2)
            producer.stop.set()
            producer.join(30)
            ids = sorted(producer.ids)
            wait_for(lambda: view.db.script_tasks.count_documents(
                {"_id": {"$in": ids}, "status": "success"}) == len(ids), 90,
                "every task a success", 0.5)

            assert all(p.running for p in roles.procs), roles.logs()
            farm = roles.farm()
            assert farm["overlaps"] == 0, "a device was asked to run two scripts at once"
            # Nothing else was stored: every task in the database is one of the producer's.
            assert view.db.script_tasks.count_documents({}) == len(ids)
            sends = Counter(r["task_id"] for r in roles.farm("runs"))
            assert set(sends) == set(ids), "every task ran on the farm, and no other"
            assert max(sends.values()) <= 4, "no task sent more than max_retries + 1 times"
            print(f"failover in {failover_s:.1f}s; {len(ids)} tasks, farm {farm['accepted']} "
                  f"runs, {sum(v > 1 for v in sends.values())} task(s) sent again; "
                  f"producer errors {dict(producer.errors)}")
        except AssertionError:
            print(roles.logs())
            raise
        finally:
            producer.stop.set()
            roles.stop()
            client.close()
            view.close()
