"""Pure parts of the console: the task filter and its query, signing of cookies and
bulk confirmations, the rates of the live chart, a task's timeline."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from console import auth
from console.data import timeline
from console.filters import Page, TaskFilter, error_prefix, to_query
from console.live import Rates, sse

SECRET = b"s" * 32


def test_filter_becomes_equalities_an_escaped_prefix_and_a_range() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    flt = TaskFilter(device=" phone-1 ", queue="bulk", script="open-app", status="failed",
                     error="HTTP 500 (x+)", batch="b1", since=since)
    assert to_query(flt) == {
        "device_id": "phone-1", "queue": "bulk", "script.id": "open-app", "status": "failed",
        "last_error": {"$regex": "^" + re.escape("HTTP 500 (x+)")}, "batch_id": "b1",
        "created_at": {"$gte": since}}
    assert TaskFilter(device="", queue="  ").is_empty()


def test_group_matches_its_members_only() -> None:
    assert to_query(TaskFilter(group="rack"), ["a", "b"]) == {"device_id": {"$in": ["a", "b"]}}
    assert to_query(TaskFilter(group="rack"), None) == {"device_id": {"$in": []}}
    assert to_query(TaskFilter(group="rack", device="c"), ["a"]) == {"device_id": {"$in": []}}
    assert to_query(TaskFilter(group="rack", device="a"), ["a"]) == {"device_id": "a"}


@pytest.mark.parametrize("fields", [
    {"device": {"$ne": ""}}, {"device": ["a"]}, {"device": "$where"}, {"queue": "a{b}"},
    {"status": "nope"}, {"error": "x" * 201}, {"$where": "1"}, {"device_id": "x"},
    {"since": "2030-01-01T00:00:00Z", "until": "2020-01-01T00:00:00Z"}, {"batch": "x" * 201},
])
def test_hostile_filters_are_refused(fields: dict) -> None:
    with pytest.raises(ValidationError):
        TaskFilter(**fields)


def test_error_prefix_has_no_pattern_power() -> None:
    pattern = re.compile(error_prefix("(a+)+$")["$regex"])
    assert pattern.match("(a+)+$ and more")
    assert not pattern.match("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!")


def test_digest_is_stable_and_bound_to_every_field() -> None:
    a = TaskFilter(device="p", status="failed")
    assert a.digest() == TaskFilter(status="failed", device=" p").digest()
    assert a.digest() != TaskFilter(device="p", status="failed", queue="q").digest()


def test_page_refuses_garbage_cursors_and_sizes() -> None:
    assert Page(limit=10, before="WzE3NjQxMjk2MDAuMCwgImFiYyJd").limit == 10
    for bad in ("x", "2026|{$gt}", "'; drop", "a" * 201):
        with pytest.raises(ValidationError):
            Page(before=bad)
    for size in (0, 201):
        with pytest.raises(ValidationError):
            Page(limit=size)


def test_cookie_is_signed_expires_and_names_its_token() -> None:
    cookie = auth.make_cookie(SECRET, "h" * 64, 60, now=1000)
    assert auth.read_cookie(SECRET, cookie, now=1030) == "h" * 64
    assert auth.read_cookie(SECRET, cookie, now=1061) is None
    assert auth.read_cookie(b"other" * 8, cookie, now=1030) is None
    forged = cookie.replace("h" * 64, "g" * 64)
    assert auth.read_cookie(SECRET, forged, now=1030) is None
    assert auth.read_cookie(SECRET, "a.b", now=0) is None


def test_confirmation_binds_action_filter_person_and_time() -> None:
    digest = TaskFilter(device="p").digest()
    token = auth.make_confirmation(SECRET, "cancel", digest, 7, "ops", 120, "n1", now=1000)
    assert auth.check_confirmation(SECRET, token, "cancel", digest, "ops",
                                   now=1100) == auth.Confirmation(7, "n1")
    with pytest.raises(ValueError, match="not valid"):  # the nonce is signed too
        auth.check_confirmation(SECRET, token.replace(".n1.", ".n2."), "cancel", digest,
                                "ops", now=1100)
    with pytest.raises(ValueError, match="another"):
        auth.check_confirmation(SECRET, token, "retry", digest, "ops", now=1100)
    with pytest.raises(ValueError, match="another"):
        auth.check_confirmation(SECRET, token, "cancel", TaskFilter(device="q").digest(),
                                "ops", now=1100)
    with pytest.raises(ValueError, match="not valid"):
        auth.check_confirmation(SECRET, token, "cancel", digest, "eve", now=1100)
    with pytest.raises(ValueError, match="expired"):
        auth.check_confirmation(SECRET, token, "cancel", digest, "ops", now=1121)
    raised = token.replace(".7.", ".9000.")
    with pytest.raises(ValueError, match="not valid"):
        auth.check_confirmation(SECRET, raised, "cancel", digest, "ops", now=1100)


def test_tokens_are_random_and_stored_as_hashes() -> None:
    a, b = auth.new_token(), auth.new_token()
    assert a != b and a.startswith("ssc_") and len(a) > 40
    assert auth.hash_token(a) != a and len(auth.hash_token(a)) == 64


def test_rates_from_counters_survive_restarts_and_keep_an_hour() -> None:
    rates = Rates(window_s=10, smooth_s=0)
    assert rates.add(0, 100, 50) is None
    assert rates.add(2, 110, 54) == (2, 5.0, 2.0)
    assert rates.add(4, 3, 1) == (4, 1.5, 0.5)  # a role restarted: counted from its new value
    assert rates.add(6, 9, 5) == (6, 3.0, 2.0)
    rates.add(15, 9, 5)
    assert [p[0] for p in rates.series()] == [6, 15]


def test_rates_are_smoothed_over_counters_published_less_often() -> None:
    rates = Rates(smooth_s=4)
    seen = [rates.add(t, s, s) for t, s in enumerate([0, 0, 10, 10, 20, 20, 30])]
    assert [p[1] for p in seen[1:]] == [0.0, 5.0, 3.33, 5.0, 5.0, 5.0]


def test_sse_message_is_one_json_line() -> None:
    msg = sse("task", {"at": datetime(2026, 1, 1, tzinfo=UTC), "text": "a\nb"})
    assert msg.startswith("event: task\ndata: {") and msg.endswith("}\n\n")
    assert msg.count("\n") == 3


def test_timeline_orders_every_dated_event() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    task = {"created_at": t0, "finished_at": t0 + timedelta(seconds=5), "status": "success"}
    records = [{"attempt": 1, "started_at": t0 + timedelta(seconds=1), "worker": "w0",
                "sent_at": t0 + timedelta(seconds=2), "finished_at": t0 + timedelta(seconds=4),
                "status": "success"}]
    logs = [{"received_at": t0 + timedelta(seconds=3), "log_type": "SUCCESS", "message": "ok"}]
    assert [e["what"] for e in timeline(task, records, logs)] == [
        "created", "attempt 1 started", "attempt 1 sent", "log SUCCESS", "attempt 1 success",
        "task success"]
