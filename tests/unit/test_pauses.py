"""Pause scopes: what each covers, which one a task waits on, and the master's gate."""

from __future__ import annotations

import pytest

from master.bus import GO, Hold
from master.pauses import LOADING, PauseGate, incident_kind
from sendscript.models import Task, utcnow
from sendscript.pauses import GLOBAL, HARD, QUOTA, Pause, PauseView, scope_of


def task(task_id: str = "t1", device: str = "d1", queue: str = "default") -> Task:
    return Task.model_validate({"_id": task_id, "device_id": device, "queue": queue,
                                "script": {"id": "s"}})


def view(*scopes: str, members: dict[str, list[str]] | None = None) -> PauseView:
    return PauseView.build({s: Pause(s, f"why {s}") for s in scopes}, members)


# -- naming scopes ------------------------------------------------------------------------


def test_scope_names() -> None:
    assert scope_of() == GLOBAL
    assert scope_of(queue="bulk") == "queue:bulk"
    assert scope_of(group="rack-7") == "group:rack-7"
    assert scope_of(device="phone 1 ") == "device:phone 1"
    assert scope_of(hard=True) == HARD
    assert scope_of(quota=True) == QUOTA


@pytest.mark.parametrize("kwargs", [
    {"queue": "a", "device": "b"}, {"group": "g", "hard": True}, {"hard": True, "quota": True},
    {"queue": ""}, {"group": "no spaces"}, {"device": "x" * 201},
])
def test_bad_scopes_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        scope_of(**kwargs)


def test_an_unreadable_flag_still_pauses() -> None:
    assert Pause.from_raw("global", b"not json").reason.startswith("unreadable flag")
    assert Pause.from_raw("global", b'{"reason": "maintenance", "by": "ops"}').by == "ops"


# -- what a view covers ---------------------------------------------------------------------


def test_no_pause_covers_nothing() -> None:
    assert PauseView.empty().match("default", "d1") is None


def test_each_scope_covers_its_tasks_only() -> None:
    v = view("queue:bulk", "group:rack", "device:d9", members={"rack": ["d1", "d2"]})
    assert v.match("bulk", "d5") == "queue:bulk"
    assert v.match("default", "d1") == "group:rack"
    assert v.match("default", "d2") == "group:rack"
    assert v.match("default", "d9") == "device:d9"
    assert v.match("default", "d5") is None
    assert v.match("high", "d3") is None


def test_a_paused_group_nobody_has_loaded_covers_no_device() -> None:
    v = view("group:rack")
    assert v.groups == ["rack"]
    assert v.match("default", "d1") is None


def test_global_and_hard_cover_everything_and_hard_is_named_first() -> None:
    assert view(GLOBAL).match("any", "d1") == GLOBAL
    assert view(GLOBAL, HARD, "queue:bulk").match("bulk", "d1") == HARD
    assert view(QUOTA, "queue:bulk").match("bulk", "d1") == QUOTA
    assert view(HARD, QUOTA).match("x", "d1") == HARD


def test_a_device_in_two_paused_groups_waits_on_one_of_them() -> None:
    v = view("group:b", "group:a", members={"a": ["d1"], "b": ["d1", "d2"]})
    assert v.match("default", "d1") == "group:a"
    assert v.match("default", "d2") == "group:b"


def test_incident_kinds() -> None:
    assert (incident_kind(HARD), incident_kind(QUOTA)) == ("hard_stop", "quota")
    assert incident_kind("queue:bulk") == incident_kind(GLOBAL) == "paused"


# -- the gate -----------------------------------------------------------------------------


def test_before_the_first_load_everything_is_held_then_the_free_ones_are_woken() -> None:
    gate = PauseGate(recheck_s=10)
    now = utcnow()
    assert gate.admit(task("t1", "d1"), now) == Hold(f"paused ({LOADING})", 10)
    assert isinstance(gate.admit(task("t2", "d2", "bulk"), now), Hold)
    change = gate.update(view("queue:bulk"))
    assert change.wake == ["d1"]
    assert [p.scope for p in change.started] == ["queue:bulk"] and change.ended == []
    assert gate.held_by_scope() == {"queue:bulk": 1}


def test_held_tasks_are_counted_by_scope_and_go_once_resumed() -> None:
    gate = PauseGate(recheck_s=10)
    gate.update(view(GLOBAL, "queue:bulk"))
    now = utcnow()
    for i in range(3):
        assert isinstance(gate.admit(task(f"t{i}", f"d{i}", "bulk" if i else "default"), now),
                          Hold)
    assert gate.held_by_scope() == {GLOBAL: 3}
    # Global lifted: the bulk tasks are still held (by their queue), d0 is woken.
    change = gate.update(view("queue:bulk"))
    assert change.wake == ["d0"] and [p.scope for p in change.ended] == [GLOBAL]
    assert gate.held_by_scope() == {"queue:bulk": 2}
    assert gate.admit(task("t0", "d0"), now) is GO
    change = gate.update(view())
    assert sorted(change.wake) == ["d1", "d2"]
    assert gate.held_by_scope() == {}
    assert gate.admit(task("t1", "d1", "bulk"), now) is GO


def test_a_plain_resume_leaves_the_hard_stop_holding() -> None:
    gate = PauseGate(recheck_s=10)
    gate.update(view(HARD, GLOBAL))
    assert isinstance(gate.admit(task(), utcnow()), Hold)
    change = gate.update(view(HARD))
    assert change.wake == [] and gate.held_by_scope() == {HARD: 1}
    assert gate.update(view()).wake == ["d1"]


def test_withdrawn_tasks_are_no_longer_counted_held() -> None:
    gate = PauseGate(recheck_s=10)
    gate.update(view(GLOBAL))
    gate.admit(task("t1", "d1"), utcnow())
    gate.admit(task("t2", "d2"), utcnow())
    gate.withdrawn(["t1"])
    assert gate.held == {"d2": ("t2", "default", GLOBAL)}


def test_the_quota_probe_lets_exactly_one_task_through() -> None:
    gate = PauseGate(recheck_s=10)
    gate.update(view(QUOTA))
    now = utcnow()
    for i in range(3):
        assert isinstance(gate.admit(task(f"t{i}", f"d{i}"), now), Hold)
    assert sorted(gate.arm_probe()) == ["d0", "d1", "d2"]
    assert gate.admit(task("t1", "d1"), now) is GO
    assert isinstance(gate.admit(task("t2", "d2"), now), Hold)
    assert gate.probes == 1 and gate.held_by_scope() == {QUOTA: 2}
    assert not gate.answered("t2", "sent")  # not the probe
    assert gate.answered("t1", "sent")
    gate.arm_probe()
    gate.admit(task("t0", "d0"), now)
    assert not gate.answered("t0", "unsent")  # a failed probe lifts nothing


def test_no_probe_goes_past_a_global_pause_or_after_the_quota_pause_ended() -> None:
    gate = PauseGate(recheck_s=10)
    gate.update(view(QUOTA, GLOBAL))
    gate.arm_probe()
    assert isinstance(gate.admit(task(), utcnow()), Hold)
    gate.update(view())
    assert not gate.probe_armed
