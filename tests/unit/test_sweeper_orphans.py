"""The leader looks for orphaned tasks once per grace, not every sweep
(master/sweeper.py): the query reads every pending task."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import redis.asyncio

from master.sweeper import Sweeper
from sendscript.settings import Settings

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def sweeper(grace_s: float) -> Sweeper:
    settings = Settings(_env_file=None, orphan_grace_s=grace_s)  # type: ignore[call-arg]
    client = redis.asyncio.Redis()  # never connected: the lease is not asked here
    return Sweeper(settings, client, recovery=None, ingest_for=None)  # type: ignore[arg-type]


def test_the_first_sweep_looks_then_once_per_grace() -> None:
    s = sweeper(30.0)
    assert s._orphans_due(NOW)
    s._orphans_checked = NOW
    assert not s._orphans_due(NOW + timedelta(seconds=5))
    assert not s._orphans_due(NOW + timedelta(seconds=29.9))
    assert s._orphans_due(NOW + timedelta(seconds=30))


def test_no_grace_looks_every_sweep() -> None:
    s = sweeper(0.0)
    s._orphans_checked = NOW
    assert s._orphans_due(NOW)
