"""Metric definitions follow Prometheus's naming rules; snapshots survive a restart;
the search's query documents are built from typed fields only."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from console import search
from sendscript import counts, metrics


def _full() -> metrics.RoleMetrics:
    m = metrics.RoleMetrics("master", "m1")
    m.taken.labels("default", "intake").inc(3)
    m.dispatched.labels("default").inc(2)
    m.answered.labels("default", "sent").inc(2)
    m.queue_wait.labels("default").observe(0.2)
    m.send_time.labels("default").observe(0.03)
    m.device_run.observe(4.0)
    m.total_time.labels("success").observe(9.0)
    m.results.labels("success").inc()
    return m


def test_every_definition_follows_the_naming_rules() -> None:
    m = _full()
    families = list(m.registry.collect())
    assert len(families) >= 12
    assert metrics.naming_problems(families) == []
    published = metrics.parse_published({"x": json.dumps(m.snapshot())})
    assert metrics.naming_problems(metrics.families_from(published)) == []
    for family in families:
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name


def test_naming_problems_are_found() -> None:
    bad = CounterMetricFamily("tasks_done", "no prefix", labels=["task_id"])
    bad.add_metric(["t1"], 1)
    wait = GaugeMetricFamily("sendscript_wait_ms", "not a base unit")
    problems = metrics.naming_problems([bad, wait])
    assert any("prefix" in p for p in problems)
    assert any("task_id" in p for p in problems)
    assert any("base unit" in p for p in problems)


def test_a_restart_resumes_from_the_last_snapshot() -> None:
    before = _full()
    after = metrics.RoleMetrics("master", "m1")
    after.resume(json.dumps(before.snapshot()))
    after.dispatched.labels("default").inc()
    after.queue_wait.labels("default").observe(50)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in after.registry.collect() for s in f.samples}
    assert samples[("sendscript_tasks_dispatched_total", (("queue", "default"),))] == 3
    assert samples[("sendscript_task_queue_wait_seconds_count", (("queue", "default"),))] == 2
    le_1 = ("sendscript_task_queue_wait_seconds_bucket", (("le", "1.0"), ("queue", "default")))
    assert samples[le_1] == 1  # the old 0.2 s, not the new 50 s
    after.resume("not json")  # a damaged entry is ignored


def test_submit_time_comes_from_object_ids_only() -> None:
    assert metrics.submitted_at("65a0f0f0f0f0f0f0f0f0f0f0") is not None
    assert metrics.submitted_at("my-own-id") is None


def test_search_filter_is_typed_and_escaped() -> None:
    q = search.TaskQuery(device_id="d1", queue="bulk", script_id="open", statuses=["failed"],
                         error_prefix="ERROR [E.*]: ($where", batch_id="b1")
    flt = search.build_filter(q)
    assert flt == {"device_id": "d1", "queue": "bulk", "script.id": "open",
                   "status": "failed", "batch_id": "b1",
                   "last_error": {"$regex": r"^ERROR\ \[E\.\*\]:\ \(\$where"}}
    assert search.build_filter(search.TaskQuery(group="g"), []) == {"device_id": {"$in": []}}
    with pytest.raises(search.SearchError):
        search.build_filter(search.TaskQuery(statuses=["$ne"]))
    with pytest.raises(search.SearchError):
        search.build_filter(search.TaskQuery(queue="x" * 1000))
    with pytest.raises(search.SearchError):
        search.decode_cursor("!!")
    doc = {"_id": "t1", "created_at": datetime(2026, 1, 1, tzinfo=UTC)}
    assert search.decode_cursor(search.encode_cursor(doc)) == (doc["created_at"], "t1")


def test_count_buckets_and_ranges() -> None:
    at = datetime(2026, 1, 1, 0, 0, 15, tzinfo=UTC)
    b = counts.bucket_of(at, 10)
    assert b == int(at.timestamp()) // 10 * 10
    assert counts.bucket_of(None, 10) == counts.NO_TIME
    assert counts.ranges([30, 10, 20, 50], 10) == [(10, 40), (50, 60)]
    assert counts.ranges(range(0, 1000, 10), 10, most=50)[0] == (10, 510)
    t = counts.tally([{"created_at": at, "status": "success", "purge_at": at},
                      {"created_at": at, "status": "pending"}], 10)
    assert dict(t[b].counts) == {"success": 1, "pending": 1}
    assert t[b].next_purge == at.timestamp()


def _info(**over: object) -> dict:
    info = {"masters": [{"master_id": "m1", "alive": True, "workers_alive": 2, "workers": 2,
                         "backpressure": {"state": "open"}}],
            "consumers": [{"name": "c1", "alive": True}], "breaker": {"state": "closed"},
            "pauses": {}, "tasks_counted": {"kept": True, "lag_s": 1.0}}
    info.update(over)
    return info


def test_monitor_health_names_what_is_unhealthy() -> None:
    from sendscript.report import health_checks
    from sendscript.settings import Settings

    settings = Settings(_env_file=None)
    assert all(ok for _, ok, _ in health_checks(settings, _info()))
    sick = health_checks(settings, _info(breaker={"state": "open"}, consumers=[],
                                         pauses={"global": {}}))
    assert {n for n, ok, _ in sick if not ok} == {"circuit breaker", "consumers alive", "pauses"}
    down = health_checks(settings, None, "ConnectionError")
    assert down == [("redis and mongo", False, "ConnectionError")]
    dead = _info(masters=[{"master_id": "m1", "alive": False}])
    assert {n for n, ok, _ in health_checks(settings, dead) if not ok} == {
        "masters alive", "workers online"}


def test_progress_rate_and_eta() -> None:
    from sendscript.report import progress

    first = (0.0, {"success": 10, "pending": 90})
    later = (10.0, {"success": 40, "failed": 10, "pending": 50})
    p = progress([first, later])
    assert (p["total"], p["done"], p["left"], p["percent"]) == (100, 50, 50, 50.0)
    assert p["rate_per_s"] == 4.0 and p["eta_s"] == 12.5
    assert progress([first])["eta_s"] is None
    assert progress([(0.0, {"success": 5})])["eta_s"] == 0.0
