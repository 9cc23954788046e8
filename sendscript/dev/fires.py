"""Checks a chaos run adds to the chaos run's when schedules and retention are in play
(pure: documents and farm runs in, findings out).

- Each cron fire once: one task per target device for every fire time, fire times one
  interval apart (two stamps inside one interval are a double fire), the schedule's
  own `fires` count equal to the fire times seen, and no fire's task run to SUCCESS
  on the farm more than once.
- Nothing deleted early: with a retention longer than the run, every task a producer
  was told is stored and every exec record a farm run names is still there.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

SAMPLES = 20


@dataclass
class FireTally:
    fires: int = 0  # distinct fire times seen in the tasks
    fires_counted: int = 0  # the schedule document's own count
    tasks: int = 0
    incomplete: int = 0  # fire times without exactly one task per target device
    double: int = 0  # fire times less than half an interval after the previous one
    gaps: int = 0  # intervals with no fire (the misfire policy may explain them)
    run_twice: int = 0  # fire tasks the farm ran to SUCCESS more than once
    samples: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        checks = [
            (self.fires == 0, "the schedule never fired"),
            (self.incomplete, f"{self.incomplete} fire(s) without one task per device"),
            (self.double, f"{self.double} fire time(s) inside one interval: fired twice"),
            (self.fires_counted != self.fires,
             f"the schedule counts {self.fires_counted} fires, the tasks show {self.fires}"),
            (self.run_twice, f"{self.run_twice} fire task(s) run to SUCCESS twice"),
        ]
        return [text for failed, text in checks if failed]


def check_fires(schedule: dict[str, Any], tasks: Iterable[dict[str, Any]],
                runs: Iterable[dict[str, Any]], devices: int,
                interval_s: float) -> FireTally:
    """One schedule's fires, from its tasks (`schedule`, `dedupe_key`, `device_id`) and
    the farm's runs."""
    tally = FireTally(fires_counted=int(schedule.get("fires") or 0))
    by_fire: dict[datetime, list[str]] = defaultdict(list)
    for doc in tasks:
        if doc.get("schedule") == schedule["_id"]:
            by_fire[fire_time(doc)].append(doc["_id"])
    tally.tasks = sum(len(ids) for ids in by_fire.values())
    tally.fires = len(by_fire)
    times = sorted(by_fire)
    for at in times:
        if len(by_fire[at]) != devices:
            tally.incomplete += 1
            _sample(tally, f"fire {at.isoformat()}: {len(by_fire[at])} task(s)")
    for before, after in itertools.pairwise(times):
        step = (after - before).total_seconds()
        if step < interval_s / 2:
            tally.double += 1
            _sample(tally, f"fires {before.isoformat()} and {after.isoformat()}")
        elif step > interval_s * 1.5:
            tally.gaps += round(step / interval_s) - 1
    fire_ids = {i for ids in by_fire.values() for i in ids}
    successes = Counter(run["task_id"] for run in runs
                        if run["task_id"] in fire_ids and run["outcome"] == "SUCCESS")
    tally.run_twice = sum(1 for n in successes.values() if n > 1)
    return tally


def fire_time(doc: dict[str, Any]) -> datetime:
    """A fire task's fire time, from its dedupe key `schedule:{name}:{time}:{device}`
    (its `run_at` moves on when it retries)."""
    stamp = (str(doc["dedupe_key"]).removeprefix(f"schedule:{doc['schedule']}:")
             .removesuffix(f":{doc['device_id']}"))
    return datetime.fromisoformat(stamp)


@dataclass
class KeptTally:
    tasks_missing: int = 0  # accepted, then gone
    records_missing: int = 0  # named by a farm run, not in Mongo
    samples: list[str] = field(default_factory=list)

    @property
    def deleted_early(self) -> int:
        return self.tasks_missing + self.records_missing


def check_kept(accepted: Iterable[str], tasks: dict[str, Any],
               records: Iterable[dict[str, Any]], runs: Iterable[dict[str, Any]]) -> KeptTally:
    """Nothing deleted: call it only when no retention window has ended in the run."""
    tally = KeptTally()
    for task_id in accepted:
        if task_id not in tasks:
            tally.tasks_missing += 1
            _sample(tally, f"task {task_id}")
    known = {r["_id"] for r in records}
    for run in runs:
        if run["task_id"] in tasks and run["record_id"] not in known:
            tally.records_missing += 1
            _sample(tally, f"record {run['record_id']} of task {run['task_id']}")
    return tally


def _sample(tally: FireTally | KeptTally, text: str) -> None:
    if len(tally.samples) < SAMPLES:
        tally.samples.append(text)
