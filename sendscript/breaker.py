"""The circuit breaker on central-control: its states and every transition, in one class.

    closed ──(failure rate ≥ degrade_at)──► degraded ──(rate < recover_below)──► closed
      │                                       │
      └──────(consecutive failures ≥ trip_after)──► open ──(pause over)──► half_open
                                                    ▲                        │
                                                    └──(probe fails)─────────┤
                                                         (probe succeeds)──► degraded

The rate is taken over a sliding window (per-second buckets) and only once the
window holds `min_volume` sends. The open pause grows with each trip in a row
(10 → 20 → 40 → 60 s) and falls back once the circuit has stayed closed for a
whole window. Degraded recovers when the rate falls below `recover_below`, or when
a whole window passes with too few sends to judge. Probes taken but never answered
(their task went nowhere, or its answer said nothing about central-control) are
handed out again after `probe_timeout_s`. `trip` opens the circuit from outside (the
drop-rate ladder). Pure:
the caller feeds outcomes and the time, and keeps the snapshot wherever it is
shared (`BreakerState` round-trips through a plain dict for Redis).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum


class Circuit(StrEnum):
    CLOSED = "closed"
    DEGRADED = "degraded"
    OPEN = "open"
    HALF_OPEN = "half_open"


TRANSITIONS: dict[Circuit, frozenset[Circuit]] = {
    Circuit.CLOSED: frozenset({Circuit.DEGRADED, Circuit.OPEN}),
    Circuit.DEGRADED: frozenset({Circuit.CLOSED, Circuit.OPEN}),
    Circuit.OPEN: frozenset({Circuit.HALF_OPEN}),
    Circuit.HALF_OPEN: frozenset({Circuit.OPEN, Circuit.DEGRADED}),
}


@dataclass(frozen=True)
class BreakerPolicy:
    window_s: int = 60
    min_volume: int = 20  # sends in the window before the rate counts
    degrade_at: float = 0.70
    recover_below: float = 0.35
    trip_after: int = 200  # consecutive failures
    pauses_s: tuple[float, ...] = (10.0, 20.0, 40.0, 60.0)
    probes: int = 1  # sends let through while half-open
    probe_timeout_s: float = 30.0  # probes unanswered this long are handed out again


@dataclass
class BreakerState:
    """What all masters share: the state, the window, the streak, the pause."""

    circuit: Circuit = Circuit.CLOSED
    since: float = 0.0
    streak: int = 0  # consecutive failures
    trips: int = 0  # opens in a row without a full recovery
    open_until: float = 0.0
    probes_left: int = 0
    probe_at: float = 0.0  # when the last probe was taken
    buckets: dict[int, list[int]] = field(default_factory=dict)  # second -> [sends, failures]

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["circuit"] = str(self.circuit)
        data["buckets"] = {str(k): v for k, v in self.buckets.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BreakerState:
        buckets = data.get("buckets") or {}
        assert isinstance(buckets, dict)
        return cls(
            circuit=Circuit(str(data.get("circuit", Circuit.CLOSED))),
            since=float(data.get("since", 0.0)),  # type: ignore[arg-type]
            streak=int(data.get("streak", 0)),  # type: ignore[call-overload]
            trips=int(data.get("trips", 0)),  # type: ignore[call-overload]
            open_until=float(data.get("open_until", 0.0)),  # type: ignore[arg-type]
            probes_left=int(data.get("probes_left", 0)),  # type: ignore[call-overload]
            probe_at=float(data.get("probe_at", 0.0)),  # type: ignore[arg-type]
            buckets={int(k): [int(x) for x in v] for k, v in buckets.items()},
        )


class InvalidCircuitChange(ValueError):
    pass


class CircuitBreaker:
    def __init__(self, policy: BreakerPolicy, state: BreakerState | None = None) -> None:
        self.policy = policy
        self.state = state or BreakerState()

    # -- what happened ----------------------------------------------------------------
    def record(self, outcomes: Iterable[bool], now: float) -> None:
        """Feed send outcomes (True: the call worked) in the order they happened.

        Outcomes that arrive while the circuit is open are of sends made before it
        opened (it lets none through): the breaker has acted on their kind already,
        and counted in the fresh window they would only hold back the recovery."""
        s = self.state
        self.evaluate(now)
        for ok in outcomes:
            if s.circuit is Circuit.OPEN:
                continue
            bucket = s.buckets.setdefault(int(now), [0, 0])
            bucket[0] += 1
            if ok:
                s.streak = 0
            else:
                bucket[1] += 1
                s.streak += 1
            if s.circuit is Circuit.HALF_OPEN:
                if ok:
                    self._move(Circuit.DEGRADED, now)
                else:
                    self._open(now)
        self.evaluate(now)

    def evaluate(self, now: float) -> Circuit:
        """Apply the transitions the window, the streak and the clock call for."""
        s, p = self.state, self.policy
        self._forget_before(now - p.window_s)
        if s.circuit is Circuit.OPEN:
            if now >= s.open_until:
                self._move(Circuit.HALF_OPEN, now)
                s.probes_left = p.probes
            return s.circuit
        if s.circuit is Circuit.HALF_OPEN:
            if s.probes_left <= 0 and now - s.probe_at >= p.probe_timeout_s:
                s.probes_left = p.probes
            return s.circuit
        if s.streak >= p.trip_after:
            self._open(now)
            return s.circuit
        rate = self.failure_rate()
        if s.circuit is Circuit.CLOSED:
            if rate is not None and rate >= p.degrade_at:
                self._move(Circuit.DEGRADED, now)
            elif now - s.since >= p.window_s:
                s.trips = 0  # a whole window closed: the next trip pauses briefly again
        elif (rate is not None and rate < p.recover_below) or (
                rate is None and now - s.since >= p.window_s):
            self._move(Circuit.CLOSED, now)
        return s.circuit

    # -- what it allows -----------------------------------------------------------------
    def allow(self, now: float) -> bool:
        """May one send go now? Half-open lets `probes` through, then waits for them."""
        circuit = self.evaluate(now)
        if circuit is Circuit.OPEN:
            return False
        if circuit is Circuit.HALF_OPEN:
            if self.state.probes_left <= 0:
                return False
            self.state.probes_left -= 1
            self.state.probe_at = now
        return True

    def give_back(self, probes: int) -> None:
        """Probes taken whose send said nothing of central-control (the device was busy,
        the store failed): hand them out again now rather than after the timeout."""
        if self.state.circuit is Circuit.HALF_OPEN:
            self.state.probes_left = min(self.policy.probes, self.state.probes_left + probes)

    def trip(self, now: float) -> bool:
        """Open a closed or degraded circuit from outside; False if it was not."""
        if self.state.circuit not in (Circuit.CLOSED, Circuit.DEGRADED):
            return False
        self._open(now)
        return True

    def failure_rate(self) -> float | None:
        sends = sum(b[0] for b in self.state.buckets.values())
        if sends < self.policy.min_volume:
            return None
        return sum(b[1] for b in self.state.buckets.values()) / sends

    def retry_in(self, now: float) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self.state.circuit is Circuit.OPEN:
            return max(0.0, self.state.open_until - now)
        return 0.0

    # -- internals -----------------------------------------------------------------------
    def _open(self, now: float) -> None:
        s, p = self.state, self.policy
        pause = p.pauses_s[min(s.trips, len(p.pauses_s) - 1)]
        s.trips += 1
        s.open_until = now + pause
        s.streak = 0
        s.buckets.clear()  # the next verdict is on what happens after the pause
        self._move(Circuit.OPEN, now)

    def _move(self, to: Circuit, now: float) -> None:
        s = self.state
        if to not in TRANSITIONS[s.circuit]:
            raise InvalidCircuitChange(f"{s.circuit} -> {to}")
        s.circuit = to
        s.since = now

    def _forget_before(self, cutoff: float) -> None:
        for second in [k for k in self.state.buckets if k < cutoff]:
            del self.state.buckets[second]
