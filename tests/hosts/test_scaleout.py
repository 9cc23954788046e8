"""Many hosts for real: 3 masters and 2 consumers in network namespaces of their own,
each under a CPU quota, against Redis with a replica and 3 Sentinels, the embedded
Mongo as a one-member replica set, Pulsar and the simulated farm; a Redis failover, a
partitioned leader host, a Mongo step-down and a master SIGKILL under load keep
invariants 1-5, each cron fire once and nothing
deleted early (bench.scaleout's fault run, shorter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendscript.dev.hosts import unavailable
from sendscript.dev.scaleout import Options, run

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]


@pytest.mark.timeout(360)
def test_faults_across_hosts_keep_the_invariants(tmp_path: Path) -> None:
    # 200 tasks at 10/s, then 2/s until the last fault is over (each strikes under load).
    # 10 s result timeouts: a silent device (2 % of runs) holds its lock 10 s, not 30.
    opts = Options(tasks=200, rate=10.0, trickle_rate=2.0, devices=40, fault_gap_s=1.0,
                   settle_timeout_s=150.0, scaling=False, task_timeout_s=10.0)
    result = run(tmp_path, opts)  # prints the tally
    report, faults = result.report, result.faults
    assert faults.errors == []
    assert faults.redis_failover_s is not None, "Sentinel promoted the replica"
    assert faults.partitioned and faults.leader_during not in (None, faults.leader_before), \
        "another master led while the leader's host was cut off"
    assert faults.mongo_stepdown.startswith("stepped down"), faults.mongo_stepdown
    assert report.kills["master"] == 1 and faults.master_back_s is not None
    assert report.tasks >= opts.tasks and not report.settle_timed_out
    assert report.lost == 0 and report.unsettled == 0, "invariant 2"
    assert report.overlaps == 0 and report.refused_busy == 0, "invariant 1"
    assert report.duplicate_sends == 0 and report.excess_sends == 0, "invariant 3"
    assert report.unexplained_runs == 0, report.unexplained
    assert result.fires.fires >= 5 and result.fires.problems() == [], result.fires.samples
    assert result.kept.deleted_early == 0, result.kept.samples
    assert result.problems == []
