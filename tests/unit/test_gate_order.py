"""The master's gate order, as `master.app` composes it, and why each gate sits where
it does. Built with no server: building a part does no I/O."""

from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest

from master.app import Master
from master.breaker import CircuitGate
from master.bus import Drop, Go, Hold
from master.device_health import BenchGate
from master.expiry import EXPIRED, Expiry
from master.limits import RateLimits
from master.pauses import PauseGate
from master.queue_caps import QueueCaps
from sendscript.breaker import BreakerState, Circuit
from sendscript.models import Task, utcnow
from sendscript.pauses import Pause, PauseView
from sendscript.settings import Settings

NOBODY = "127.0.0.1:1"  # nothing is ever connected to


@pytest.fixture
def master() -> Master:
    settings = Settings(redis_url=f"redis://{NOBODY}", mongo_url=f"mongodb://{NOBODY}/x",
                        central_url=f"http://{NOBODY}", rate_limits="global=5/1s",
                        queues="vip=1")
    m = Master(settings)
    m._build()
    m.pausing.gate.update(PauseView.build({}))  # loaded: nothing paused
    m.rate_limits._by_device = {}  # no group limits to load
    state = m.rate_limits._global
    assert state is not None
    state.tokens, state.spend_until = 5, math.inf
    return m


def task(device: str = "d1", **fields: object) -> Task:
    return Task.model_validate({"_id": f"t-{device}", "device_id": device,
                                "script": {"id": "s"}, **fields})


def half_open_with_one_permit(m: Master) -> CircuitGate:
    m.breaker.gate.update(BreakerState(circuit=Circuit.HALF_OPEN), permits=1)
    return m.breaker.gate


def tokens(m: Master) -> int:
    assert m.rate_limits._global is not None
    return m.rate_limits._global.tokens


def test_the_gates_are_wired_in_one_order(master: Master) -> None:
    kinds = [type(g) for g in master.bus.gates]
    assert kinds == [Expiry, BenchGate, PauseGate, QueueCaps, CircuitGate, RateLimits]
    assert master.bus.gates == master.gates()


def test_expiry_is_first_an_expired_task_is_dropped_whatever_holds_its_device(
        master: Master) -> None:
    now = utcnow()
    master.benching.gate.add("d1", time.time() + 60, time.time())
    stale = task(expire_at=now - timedelta(seconds=1))
    assert master.bus.admit(stale, now) == Drop(EXPIRED)  # not held for ever


def test_a_benched_device_spends_no_probe_permit_and_no_token(master: Master) -> None:
    gate = half_open_with_one_permit(master)
    master.benching.gate.add("d1", time.time() + 60, time.time())
    assert isinstance(master.bus.admit(task("d1"), utcnow()), Hold)
    assert gate.permits == 1 and tokens(master) == 5
    assert isinstance(master.bus.admit(task("d2"), utcnow()), Go)  # the probe
    assert gate.permits == 0 and tokens(master) == 4


def test_a_paused_task_spends_no_probe_permit_and_no_token(master: Master) -> None:
    gate = half_open_with_one_permit(master)
    master.pausing.gate.update(PauseView.build({"device:d1": Pause("device:d1")}))
    assert isinstance(master.bus.admit(task("d1"), utcnow()), Hold)
    assert gate.permits == 1 and tokens(master) == 5


def test_a_task_whose_queue_is_at_its_cap_spends_no_probe_permit_and_no_token(
        master: Master) -> None:
    # The cap is counted across masters in Redis: a task without a slot is held (and
    # asked for) before the breaker may give it a probe permit or the limits a token.
    gate = half_open_with_one_permit(master)
    capped = task("d1", queue="vip")
    assert isinstance(master.bus.admit(capped, utcnow()), Hold)
    assert gate.permits == 1 and tokens(master) == 5
    assert master.queue_caps.wanted == {capped.id: ("vip", "d1")}
    master.queue_caps.granted[capped.id] = "vip"  # the loop reserved it a slot
    assert isinstance(master.bus.admit(capped, utcnow()), Go)
    assert gate.permits == 0 and tokens(master) == 4


def test_rate_limits_are_last_a_task_the_breaker_holds_spends_no_token(
        master: Master) -> None:
    master.breaker.gate.update(BreakerState(circuit=Circuit.OPEN,
                                            open_until=time.time() + 60))
    assert isinstance(master.bus.admit(task("d1"), utcnow()), Hold)
    assert tokens(master) == 5
    master.breaker.gate.update(BreakerState(circuit=Circuit.CLOSED))
    assert isinstance(master.bus.admit(task("d1"), utcnow()), Go)
    assert tokens(master) == 4


def test_without_rate_limits_there_is_no_rate_gate() -> None:
    settings = Settings(redis_url=f"redis://{NOBODY}", mongo_url=f"mongodb://{NOBODY}/x",
                        central_url=f"http://{NOBODY}")
    m = Master(settings)
    m._build()
    assert [type(g) for g in m.bus.gates] == [Expiry, BenchGate, PauseGate, CircuitGate]
