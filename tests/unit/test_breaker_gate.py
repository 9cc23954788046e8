"""The breaker's gate, the breaker's additions (probe re-arm, trip), and what a send's
failure says of central-control: pure, no servers."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest

from master.breaker import CircuitGate
from master.bus import Go, Hold
from sendscript.breaker import BreakerPolicy, BreakerState, Circuit, CircuitBreaker
from sendscript.models import Task, new_id
from worker.central import CentralError, check_response, transport_error

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def task(device: str = "d1") -> Task:
    return Task(_id=new_id(), device_id=device, script={"id": "tap"})


class Inflight:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        return self.n


def gate(cap: int = 2) -> tuple[CircuitGate, Inflight]:
    inflight = Inflight()
    return CircuitGate(cap, inflight, recheck_s=0.5), inflight


def test_closed_lets_everything_go() -> None:
    g, _ = gate()
    assert isinstance(g.admit(task(), NOW), Go)
    assert g.held == {}


def test_open_holds_until_the_probe_is_due_and_wakes_held_devices_on_half_open() -> None:
    g, _ = gate()
    g.update(BreakerState(circuit=Circuit.OPEN, open_until=NOW.timestamp() + 10))
    verdict = g.admit(task("d1"), NOW)
    assert isinstance(verdict, Hold) and verdict.reason == "breaker open"
    assert verdict.retry_s == pytest.approx(10.5)
    assert list(g.held) == ["d1"]
    assert g.update(BreakerState(circuit=Circuit.HALF_OPEN)) == ["d1"]
    assert g.held == {}


def test_half_open_admits_only_the_permits_taken() -> None:
    g, _ = gate()
    g.update(BreakerState(circuit=Circuit.HALF_OPEN))
    assert isinstance(g.admit(task("d1"), NOW), Hold)
    assert g.wanted
    assert g.update(BreakerState(circuit=Circuit.HALF_OPEN), permits=1) == ["d1"]
    assert not g.wanted
    assert isinstance(g.admit(task("d1"), NOW), Go)
    assert isinstance(g.admit(task("d2"), NOW), Hold)
    assert g.probes == 1


def test_permits_lapse_when_the_circuit_leaves_half_open() -> None:
    g, _ = gate()
    g.update(BreakerState(circuit=Circuit.HALF_OPEN), permits=1)
    g.update(BreakerState(circuit=Circuit.OPEN, open_until=NOW.timestamp() + 20))
    assert g.permits == 0
    assert isinstance(g.admit(task(), NOW), Hold)


def test_degraded_admits_below_the_cap_and_makes_room_on_answers() -> None:
    g, inflight = gate(cap=2)
    g.update(BreakerState(circuit=Circuit.DEGRADED))
    inflight.n = 1
    assert isinstance(g.admit(task("d1"), NOW), Go)
    inflight.n = 2
    assert isinstance(g.admit(task("d2"), NOW), Hold)
    assert isinstance(g.admit(task("d3"), NOW), Hold)
    assert g.room() == []  # still at the cap
    inflight.n = 1
    assert g.room() == ["d2"]
    assert list(g.held) == ["d3"]


def test_the_drop_rate_floor_degrades_a_closed_gate_and_lifting_it_wakes() -> None:
    g, inflight = gate(cap=1)
    g.set_floor(Circuit.DEGRADED)
    assert g.effective() is Circuit.DEGRADED
    inflight.n = 1
    assert isinstance(g.admit(task("d1"), NOW), Hold)
    assert g.set_floor(Circuit.CLOSED) == ["d1"]
    assert isinstance(g.admit(task("d1"), NOW), Go)


def test_an_unanswered_probe_is_handed_out_again_after_the_probe_timeout() -> None:
    b = CircuitBreaker(BreakerPolicy(trip_after=2, pauses_s=(5.0,), probe_timeout_s=3.0))
    b.record([False, False], 100.0)
    assert b.state.circuit is Circuit.OPEN
    assert b.allow(105.0)  # half-open: the probe
    assert not b.allow(106.0)
    assert not b.allow(107.9)
    assert b.allow(108.0)  # the probe never answered


def test_trip_opens_a_closed_or_degraded_circuit_only() -> None:
    b = CircuitBreaker(BreakerPolicy(pauses_s=(10.0, 20.0)))
    assert b.trip(50.0)
    assert b.state.circuit is Circuit.OPEN and b.state.open_until == 60.0
    assert not b.trip(51.0)  # already open: the pause is not pushed back
    assert b.state.open_until == 60.0


def test_state_round_trips_with_the_probe_time() -> None:
    state = BreakerState(circuit=Circuit.HALF_OPEN, probe_at=12.5, buckets={3: [2, 1]})
    assert BreakerState.from_dict(state.to_dict()) == state


def response(status: int, body: object) -> httpx.Response:
    return httpx.Response(status, json=body,
                          request=httpx.Request("POST", "http://central/api/script/send"))


def refusal(status: int, body: object) -> CentralError:
    with pytest.raises(CentralError) as info:
        check_response(response(status, body))
    return info.value


def test_sick_central_answers() -> None:
    assert refusal(503, {"success": False}).sick
    assert refusal(500, {}).sick
    assert refusal(429, {}).sick
    assert refusal(408, {}).sick
    assert transport_error(httpx.ConnectError("refused")).sick
    assert transport_error(httpx.ReadTimeout("slow")).sick


def test_answers_that_say_nothing_of_central() -> None:
    assert not refusal(409, {"success": False}).sick  # the device is busy
    assert not refusal(400, {"success": False}).sick
    assert not refusal(200, {"success": False}).sick


def test_the_body_error_code_is_kept() -> None:
    assert refusal(402, {"success": False, "code": "QUOTA"}).code == "QUOTA"
    assert refusal(200, {"success": False, "errorCode": 7}).code == "7"
    assert refusal(503, {"success": False}).code is None
    with pytest.raises(CentralError) as info:
        check_response(httpx.Response(502, text="<html>bad gateway</html>",
                                      request=httpx.Request("POST", "http://c/")))
    assert info.value.code is None


def test_outcomes_arriving_while_open_are_not_counted() -> None:
    b = CircuitBreaker(BreakerPolicy(trip_after=3, min_volume=1, pauses_s=(10.0,)))
    b.record([False, False, False, False, False], 100.0)  # two answers after the trip
    assert b.state.circuit is Circuit.OPEN
    assert b.state.streak == 0 and b.state.buckets == {}
    b.record([False] * 10, 105.0)  # sends made before it opened, answered late
    assert b.state.streak == 0 and b.state.buckets == {}
    b.record([True], 110.0)  # the pause is over: this is the probe
    # Half-open -> degraded -> closed at once: the window holds the probe alone.
    assert b.state.circuit is Circuit.CLOSED and b.state.buckets == {110: [1, 0]}


def test_a_probe_given_back_is_handed_out_again_at_once() -> None:
    b = CircuitBreaker(BreakerPolicy(trip_after=1, pauses_s=(5.0,), probe_timeout_s=60.0))
    b.record([False], 100.0)
    assert b.allow(105.0) and not b.allow(105.5)
    b.give_back(1)  # the probe's device was busy: nothing learned
    assert b.allow(106.0)
    b.give_back(5)
    assert b.state.probes_left == 1  # never more than the policy's probes


def test_the_gate_knows_its_probes_answers() -> None:
    g, _ = gate()
    g.update(BreakerState(circuit=Circuit.HALF_OPEN), permits=1)
    probe = task("d1")
    assert isinstance(g.admit(probe, NOW), Go)
    assert not g.probe_answered("other")
    assert g.probe_answered(probe.id)
    assert not g.probe_answered(probe.id)
