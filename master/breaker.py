"""The circuit breaker on central-control in the master: a gate, a subscriber, a loop.

Naming: one noun per concern; `sendscript/breaker.py` holds its state and rule, shared by
every role, and `master/breaker.py` (this module) the master part that drives it.

Every worker answer says what the send told of central-control (`TaskDone.central_ok`:
accepted, failed in a way that says it is unwell, or nothing about it). The
subscriber keeps those outcomes in order; the loop, every `breaker_sync_s`, merges
them into the state all masters share in Redis and reads it back: the Python class
(`sendscript.breaker.CircuitBreaker`) decides the transitions on the state as read,
and one Lua call writes it back if nobody wrote in between (compare-and-set on a
version), or hands back the newer state to merge into again (a read that finds
the state changed by another master is judged at once the same way). So every
master sees one state within about one sync interval.

The gate answers from the last state read, in O(1):
- closed: Go;
- open: Hold until the probe is due (no attempt used);
- half-open: Go for the probe permits this master took from the shared state (one
  per probe, cluster-wide), Hold for the rest; a probe whose answer says nothing of
  central-control (busy device, store error) is given back at the next sync;
- degraded: Go while this master has fewer than `breaker_degraded_concurrency` tasks
  in flight, else Hold.
The drop-rate ladder (master/droprate.py) may degrade the gate (a floor) or trip
the shared breaker open, by event (`BreakerFloorRequested`, `BreakerTripRequested`).
Held devices are woken when the state lets more through.
Opening raises Incident("breaker_open"); closing again resolves it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio
from loguru import logger

from master.bus import GO, Bus, Hold, Subscription, Verdict
from master.events import (
    BreakerFloorRequested,
    BreakerTripRequested,
    Incident,
    TaskAnswered,
    TasksWithdrawn,
    WakeRequested,
)
from sendscript.backoff import every
from sendscript.breaker import BreakerPolicy, BreakerState, Circuit, CircuitBreaker
from sendscript.models import Task
from sendscript.settings import Settings

INCIDENT = "breaker_open"
INCIDENT_KEY = "central-control"
MAX_PENDING = 100_000  # outcomes kept while Redis cannot be reached (the oldest go)
CAS_TRIES = 5
# How restrictive each state is: a move down the scale lets held tasks go again.
STRICTNESS = {Circuit.CLOSED: 0, Circuit.DEGRADED: 1, Circuit.HALF_OPEN: 2, Circuit.OPEN: 3}

# KEYS[1] the shared breaker: a hash with `version` (an integer, absent = 0) and
# `state` (BreakerState as JSON).
# ARGV[1] the version the caller merged into; ARGV[2] the new state as JSON, or ""
# to only read.
# Writes the state with version ARGV[1]+1 only if the stored version is still
# ARGV[1]. Returns {1, version, state} once written (or read), {0, version, state}
# on a conflict: the caller merges into that state and tries again.
SYNC = """
local version = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[2] ~= '' then
  if version ~= tonumber(ARGV[1]) then
    return {0, version, redis.call('HGET', KEYS[1], 'state') or ''}
  end
  version = version + 1
  redis.call('HSET', KEYS[1], 'version', version, 'state', ARGV[2])
  return {1, version, ARGV[2]}
end
return {1, version, redis.call('HGET', KEYS[1], 'state') or ''}
"""


def policy_from(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        window_s=settings.breaker_window_s, min_volume=settings.breaker_min_volume,
        degrade_at=settings.breaker_degrade_at, recover_below=settings.breaker_recover_below,
        trip_after=settings.breaker_trip_after, pauses_s=settings.breaker_pauses_s,
        probes=settings.breaker_probes, probe_timeout_s=settings.breaker_probe_timeout_s)


def parse_state(raw: bytes | str | None) -> BreakerState:
    if not raw:
        return BreakerState()
    return BreakerState.from_dict(json.loads(raw))


def central_outcome(answer: TaskAnswered) -> bool | None:
    """The breaker's input from one answer: None when it says nothing of central."""
    return answer.answer.central_ok


class CircuitGate:
    """The gate, pure: the last shared state read, this master's probe permits and
    the devices it holds."""

    def __init__(self, degraded_cap: int, inflight: Callable[[], int],
                 recheck_s: float) -> None:
        self.degraded_cap = degraded_cap
        self.inflight = inflight
        self.recheck_s = recheck_s
        self.circuit = Circuit.CLOSED
        self.open_until = 0.0  # wall clock, shared by every master
        self.floor = Circuit.CLOSED  # the drop-rate ladder's: DEGRADED or CLOSED
        self.permits = 0  # probes this master may send while half-open
        self.probe_tasks: set[str] = set()  # the probes it sent, until answered
        self.wanted = False  # a task waited for a probe permit
        self.held: dict[str, None] = {}  # devices held, in order (a set that keeps it)
        self.holds = 0
        self.probes = 0

    def effective(self) -> Circuit:
        if self.circuit is Circuit.CLOSED and self.floor is Circuit.DEGRADED:
            return Circuit.DEGRADED
        return self.circuit

    def admit(self, task: Task, now: datetime) -> Verdict:
        circuit = self.effective()
        if circuit is Circuit.CLOSED:
            return self._go(task)
        if circuit is Circuit.DEGRADED:
            if self.inflight() < self.degraded_cap:
                return self._go(task)
            return self._hold(task, "breaker degraded", self.recheck_s)
        if circuit is Circuit.HALF_OPEN:
            if self.permits > 0:
                self.permits -= 1
                self.probes += 1
                self.probe_tasks.add(task.id)
                return self._go(task)
            self.wanted = True
            return self._hold(task, "breaker half-open", self.recheck_s)
        wait = max(self.open_until - now.timestamp(), 0.0) + self.recheck_s
        return self._hold(task, "breaker open", wait)

    def _go(self, task: Task) -> Verdict:
        self.held.pop(task.device_id, None)
        return GO

    def _hold(self, task: Task, reason: str, retry_s: float) -> Verdict:
        self.held[task.device_id] = None
        self.holds += 1
        return Hold(reason, retry_s)

    def update(self, state: BreakerState, permits: int = 0) -> list[str]:
        """Apply a state read (and probe permits taken); the held devices to wake."""
        looser = STRICTNESS[state.circuit] < STRICTNESS[self.circuit]
        self.circuit = state.circuit
        self.open_until = state.open_until
        if state.circuit is not Circuit.HALF_OPEN:
            self.permits = 0
            self.wanted = False
            self.probe_tasks.clear()
        if permits:
            self.permits += permits
            self.wanted = False
        return self.wake_all() if looser or permits else []

    def probe_answered(self, task_id: str) -> bool:
        """Was this answer one of our probes'?"""
        if task_id in self.probe_tasks:
            self.probe_tasks.discard(task_id)
            return True
        return False

    def set_floor(self, floor: Circuit) -> list[str]:
        looser = floor is Circuit.CLOSED and self.floor is not Circuit.CLOSED
        self.floor = floor
        return self.wake_all() if looser else []

    def room(self) -> list[str]:
        """Degraded and below the cap: held devices that may go now."""
        if self.effective() is not Circuit.DEGRADED or not self.held:
            return []
        n = self.degraded_cap - self.inflight()
        devices = list(self.held)[:max(n, 0)]
        for device in devices:
            del self.held[device]
        return devices

    def wake_all(self) -> list[str]:
        devices, self.held = list(self.held), {}
        return devices

    def forget(self, device_ids: list[str]) -> None:
        for device in device_ids:
            self.held.pop(device, None)


@dataclass
class Synced:
    state: BreakerState
    version: int
    permits: int  # probe permits this sync took


class CircuitBreakerPart:
    """The breaker on the bus: the gate, the answers' subscriber and the sync loop."""

    def __init__(self, settings: Settings, bus: Bus, client: redis.asyncio.Redis,
                 inflight: Callable[[], int]) -> None:
        self.settings = settings
        self.bus = bus
        self.redis = client
        self.policy = policy_from(settings)
        self.gate = CircuitGate(settings.breaker_degraded_concurrency, inflight,
                                max(settings.breaker_sync_s, 0.2))
        self.state = BreakerState()
        self.version = 0
        self.synced_once = False
        self._pending: list[bool] = []  # outcomes not yet merged, in order
        self._trip: str | None = None  # why the ladder asked to open, until merged
        self._given_back = 0  # probes answered with nothing about central, until merged
        self._incident = False
        self.failures = 0
        self.successes = 0
        self.syncs = 0
        self.conflicts = 0
        self.opened = 0

    def subscriptions(self) -> list[Subscription]:
        return [
            (TaskAnswered, self._on_answered),
            (TasksWithdrawn, lambda e: self.gate.forget([t.device_id for t in e.tasks])),
            (BreakerTripRequested, lambda e: self.trip(e.why)),
            (BreakerFloorRequested, lambda e: self.set_floor(e.floor)),
        ]

    # -- inputs ---------------------------------------------------------------------------
    def _on_answered(self, event: TaskAnswered) -> None:
        ok = central_outcome(event)
        if self.gate.probe_answered(event.task.id) and ok is None:
            self._given_back += 1
        if ok is not None:
            if ok:
                self.successes += 1
            else:
                self.failures += 1
            self._pending.append(ok)
            if len(self._pending) > MAX_PENDING:
                del self._pending[:len(self._pending) - MAX_PENDING]
        self._wake(self.gate.room())

    def trip(self, why: str) -> None:
        """Open the shared breaker at the next sync (the drop-rate ladder asks, by event)."""
        self._trip = why

    def set_floor(self, floor: Circuit) -> None:
        """Degrade this master's gate whatever the shared state (the ladder asks, by event)."""
        self._wake(self.gate.set_floor(floor))

    # -- the loop --------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await every(stop, self.settings.breaker_sync_s, "circuit breaker", self.sync)

    async def sync(self) -> Synced:
        """Merge this master's outcomes into the shared state; apply what it says."""
        outcomes, self._pending = self._pending, []
        trip, given_back = self._trip, self._given_back
        try:
            synced = await self._merge(outcomes, trip, given_back)
        except Exception:
            self._pending[:0] = outcomes  # merged next time; meanwhile judge them locally
            local = CircuitBreaker(self.policy, BreakerState.from_dict(self.state.to_dict()))
            self._feed(local, self._pending, time.time())
            self._apply(local.state, 0)
            raise
        if trip is not None and self._trip == trip:
            self._trip = None
        self._given_back -= given_back
        self.state, self.version = synced.state, synced.version
        self.synced_once = True
        self.syncs += 1
        self._apply(synced.state, synced.permits)
        return synced

    async def _merge(self, outcomes: list[bool], trip: str | None, given_back: int) -> Synced:
        state, version = self.state, self.version
        want_probe = self.gate.wanted and self.gate.permits == 0
        for _ in range(CAS_TRIES):
            now = time.time()
            breaker = CircuitBreaker(self.policy, BreakerState.from_dict(state.to_dict()))
            before = breaker.state.to_dict()
            self._feed(breaker, outcomes, now)
            breaker.give_back(given_back)
            if trip is not None and breaker.trip(now):
                logger.warning("circuit breaker opened: {}", trip)
            permits = 0
            if want_probe and breaker.state.circuit is Circuit.HALF_OPEN:
                while permits < self.policy.probes and breaker.allow(now):
                    permits += 1
            after = breaker.state.to_dict()
            new = json.dumps(after) if after != before else ""  # "": only read
            written, stored_version, raw = await self.redis.eval(  # type: ignore[misc]
                SYNC, 1, self.settings.keys.breaker, version, new)
            if written and (new or int(stored_version) == version):
                return Synced(parse_state(raw), int(stored_version), permits)
            # A conflict, or another master changed it since we last read: judge the
            # newer state now rather than one sync later.
            self.conflicts += 0 if written else 1
            state, version = parse_state(raw), int(stored_version)
        raise RuntimeError(f"circuit breaker: {CAS_TRIES} write conflicts in a row")

    def _feed(self, breaker: CircuitBreaker, outcomes: list[bool], now: float) -> None:
        if outcomes:
            breaker.record(outcomes, now)
        else:
            breaker.evaluate(now)

    def _apply(self, state: BreakerState, permits: int) -> None:
        before = self.gate.circuit
        self._wake(self.gate.update(state, permits))
        after = state.circuit
        if after is before:
            return
        logger.warning("circuit breaker on central-control: {} -> {}", before, after)
        if after is Circuit.OPEN:
            self.opened += 1
            if not self._incident:
                self._incident = True
                self.bus.emit(Incident(INCIDENT, INCIDENT_KEY, True, self._detail(state)))
        elif after is Circuit.CLOSED and self._incident:
            self._incident = False
            self.bus.emit(Incident(INCIDENT, INCIDENT_KEY, False, "closed again"))

    def _detail(self, state: BreakerState) -> str:
        pause = max(0.0, state.open_until - time.time())
        return (f"central-control failing: nothing is sent for {pause:.0f}s, then a probe "
                f"(trip {state.trips} in a row)")

    def _wake(self, devices: list[str]) -> None:
        if devices:
            self.bus.emit(WakeRequested(devices))

    def report(self) -> dict[str, Any]:
        state = self.state
        sends = sum(b[0] for b in state.buckets.values())
        fails = sum(b[1] for b in state.buckets.values())
        return {
            "state": str(self.gate.effective()),
            "shared": str(state.circuit),
            "floor": str(self.gate.floor),
            "failure_rate": round(fails / sends, 3) if sends else None,
            "window_sends": sends,
            "streak": state.streak,
            "trips": state.trips,
            "open_for_s": round(max(0.0, state.open_until - time.time()), 1)
            if state.circuit is Circuit.OPEN else 0.0,
            "held": len(self.gate.held),
            "holds": self.gate.holds,
            "probes": self.gate.probes,
            "opened": self.opened,
            "degraded_concurrency": self.gate.degraded_cap,
            "limits": {"degrade_at": self.policy.degrade_at,
                       "recover_below": self.policy.recover_below,
                       "trip_after": self.policy.trip_after,
                       "window_s": self.policy.window_s,
                       "pauses_s": list(self.policy.pauses_s)},
        }
