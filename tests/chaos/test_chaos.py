"""A bounded chaos run: kills and server restarts under load keep invariants 1-5."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendscript.dev.chaos import BAD_ITEMS, BAD_LOGS, print_report, run_chaos

pytestmark = pytest.mark.e2e

SERVERS = ("redis", "mongo", "pulsar")


@pytest.mark.timeout(330)
def test_invariants_hold_through_kills_and_server_restarts(tmp_path: Path) -> None:
    # Restarts every 10 s: each server's first stop is a SIGKILL, the second a SIGTERM.
    report = run_chaos(tmp_path, duration_s=60, kill_every_s=3.0, restart_every_s=10.0,
                       down_s=2.0, devices=30, rate=15.0, seed=11, settle_timeout_s=120,
                       server_stop="alternate")
    print_report(report)
    # Kills take turns (worker, master, consumer); a master's restart is waited for.
    kills = [report.kills[k] for k in ("worker", "master", "consumer")]
    assert min(kills) >= 3 and sum(kills) >= 10, dict(report.kills)
    assert all(report.restarts_sigkill[s] >= 1 for s in SERVERS), dict(report.restarts_sigkill)
    assert sum(report.restarts_sigterm.values()) >= 1, dict(report.restarts_sigterm)
    assert report.tasks >= 500
    assert not report.settle_timed_out, f"not settled in {report.settle_s:.0f}s"
    assert report.lost == 0, ("invariant 2: accepted tasks lost", report.lost_sdk,
                              report.lost_raw)
    assert report.unsettled == 0, ("invariant 2: every task terminal", report.unsettled_tasks)
    assert report.overlaps == 0 and report.refused_busy == 0, "invariant 1"
    assert report.duplicate_sends == 0 and report.excess_sends == 0, "invariant 3"
    assert report.unexplained_runs == 0, ("invariant 3: runs without their own attempt",
                                          report.unexplained)
    assert report.phantom_success == 0, report.phantom_success_tasks
    assert report.fence_repeats == 0, report.fence_repeat_samples
    assert report.quarantined >= len(BAD_ITEMS) and report.bad_items_not_quarantined == 0
    assert report.quarantined_without_reason == 0, "invariant 4"
    assert report.dead_lettered >= len(BAD_LOGS) and report.bad_logs_not_dead_lettered == 0
    assert report.dead_lettered_without_reason == 0
    assert report.ok(), report.problems()
