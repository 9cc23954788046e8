"""A bounded chaos run: kills and server restarts under load keep invariants 1-5."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import print_report, run_chaos

pytestmark = pytest.mark.e2e


def test_invariants_hold_through_kills_and_server_restarts(tmp_path: Path) -> None:
    report = run_chaos(tmp_path, duration_s=60, kill_every_s=3.0, restart_every_s=14.0,
                       down_s=2.0, devices=30, rate=15.0, seed=11, settle_timeout_s=150)
    print_report(report)
    assert min(report.kills[k] for k in ("worker", "master", "consumer")) >= 4
    assert {report.restarts[s] for s in ("redis", "mongo", "pulsar")} == {1}
    assert report.tasks >= 500
    assert report.lost == 0, "invariant 2: every task terminal or scheduled"
    assert report.overlaps == 0 and report.refused_busy == 0, "invariant 1"
    assert report.duplicate_sends == 0 and report.excess_sends == 0, "invariant 3"
    assert report.quarantined == 4 and report.quarantined_without_reason == 0, "invariant 4"
    assert report.dead_lettered == 2 and report.dead_lettered_without_reason == 0
    assert report.ok()
