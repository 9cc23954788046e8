"""Prometheus metrics: their definitions, and how each process publishes its own.

Each role process keeps its own counters and histograms in a
private `CollectorRegistry` and publishes a snapshot of them every heartbeat into
the Redis hash `{prefix}:metrics` (field `{role}:{instance}`, JSON). The console's
`/metrics` renders every snapshot with `role` and `instance` labels, beside gauges
read at scrape time from Redis (queue lengths, heartbeats, breaker, task counts
kept by `sendscript.counts`). Nothing scans a Mongo collection at scrape time.

Why not prometheus_client's multiprocess mode: the master's worker processes
observe nothing the master does not already see (every answer comes back with
its timings on the bus), so one registry per role process is enough; and the
roles of a cluster live on several hosts, which a per-host directory of files
cannot join. A restarted process starts from its last published snapshot
(`RoleMetrics.resume`), so its counters keep growing across restarts; what it
counted after its last publish before a crash is lost (at most one heartbeat).

Naming follows Prometheus's rules: the `sendscript_` prefix, base units
(seconds), `_total` on counters, and no label whose values grow with the data
(no task, record or device id).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from sendscript.status import RECORD_OPEN

PREFIX = "sendscript"
# Labels whose values are bounded by configuration, never by the data.
ALLOWED_LABELS = frozenset({"queue", "outcome", "source", "reason", "role", "instance",
                            "status", "state", "kind", "master", "consumer", "list"})
FORBIDDEN_LABELS = frozenset({"task_id", "task", "device_id", "device", "record_id", "record",
                              "batch_id", "dedupe_key", "script"})

# Seconds: sub-second waits and sends up to minutes-long device runs.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TOTAL_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400)


class RoleMetrics:
    """The metrics one process keeps (master or consumer), in a registry of its own."""

    def __init__(self, role: str, instance: str) -> None:
        self.role = role
        self.instance = instance
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # -- master (from the event seam: master/metering.py) --
        self.taken = Counter("sendscript_tasks_taken_total",
                             "Due tasks a master took in, by queue and source (intake, "
                             "delayed, schedule, restore, recovery)",
                             ["queue", "source"], registry=r)
        self.dispatched = Counter("sendscript_tasks_dispatched_total",
                                  "Tasks handed to a worker", ["queue"], registry=r)
        self.answered = Counter("sendscript_tasks_answered_total",
                                "Workers' answers for dispatched tasks, by outcome",
                                ["queue", "outcome"], registry=r)
        self.withdrawn = Counter("sendscript_tasks_withdrawn_total",
                                 "Queued tasks taken off the board undispatched",
                                 ["reason"], registry=r)
        self.lost = Counter("sendscript_worker_tasks_lost_total",
                            "Tasks held by a worker that died", registry=r)
        self.queue_wait = Histogram("sendscript_task_queue_wait_seconds",
                                    "Time on the master's board before dispatch",
                                    ["queue"], buckets=WAIT_BUCKETS, registry=r)
        self.send_time = Histogram("sendscript_task_send_seconds",
                                   "Dispatch to the worker's answer: lock, claim, record, POST",
                                   ["queue"], buckets=SEND_BUCKETS, registry=r)
        # -- consumer (consumers/task_log.py) --
        self.logs_saved = Counter("sendscript_task_logs_saved_total",
                                  "Task logs stored (redeliveries not counted)", registry=r)
        self.results = Counter("sendscript_results_applied_total",
                               "Device results applied to their task, by outcome",
                               ["outcome"], registry=r)
        self.dead_lettered = Counter("sendscript_task_logs_dead_lettered_total",
                                     "Task logs sent to the dead-letter topic", registry=r)
        self.retries = Counter("sendscript_task_retries_total",
                               "Failed attempts queued for a retry", ["source"], registry=r)
        self.device_run = Histogram("sendscript_device_run_seconds",
                                    "The device's run: its result's time minus the send",
                                    buckets=RUN_BUCKETS, registry=r)
        self.total_time = Histogram("sendscript_task_finish_seconds",
                                    "Submit to a result applied (submit time from the task id)",
                                    ["outcome"], buckets=TOTAL_BUCKETS, registry=r)

    # -- publishing ----------------------------------------------------------------
    @property
    def field(self) -> str:
        return f"{self.role}:{self.instance}"

    def snapshot(self) -> dict[str, Any]:
        """Every sample with a value, as JSON-able data (see `families_from`)."""
        metrics: list[dict[str, Any]] = []
        for family in self.registry.collect():
            samples = [[s.name, s.labels, s.value] for s in family.samples
                       if not s.name.endswith("_created")]
            if samples:
                metrics.append({"name": family.name, "type": family.type,
                                "help": family.documentation, "samples": samples})
        return {"role": self.role, "instance": self.instance, "at": time.time(),
                "metrics": metrics}

    def publish(self, pipe: Any, key: str) -> None:
        """Queue the snapshot's write on a Redis pipeline (the heartbeat's)."""
        pipe.hset(key, self.field, json.dumps(self.snapshot()))

    def resume(self, raw: bytes | str | None) -> None:
        """Start from this instance's last published snapshot: counters and histograms
        keep growing across a restart instead of falling back to zero."""
        if not raw:
            return
        try:
            data = json.loads(raw)
        except ValueError:
            return
        by_name = {m._name: m for m in _own(self)}
        below: dict[tuple[str, ...], float] = {}  # cumulative count of the bucket before
        for family in data.get("metrics", []):
            metric = by_name.get(_base(family["name"], family["type"]))
            if metric is None:
                continue
            for name, labels, value in family["samples"]:
                _restore(metric, family["type"], name, labels, value, below)


def _own(m: RoleMetrics) -> list[Any]:
    return [v for v in vars(m).values() if isinstance(v, Counter | Histogram)]


def _base(name: str, kind: str) -> str:
    return name.removesuffix("_total") if kind == "counter" else name


def _restore(metric: Any, kind: str, name: str, labels: dict[str, str], value: float,
             below: dict[tuple[str, ...], float]) -> None:
    """Add a published sample back into a fresh metric (counters: `_total`; histograms:
    per-bucket counts from the cumulative ones, and the sum)."""
    if kind == "counter" and name.endswith("_total"):
        child = metric.labels(**labels) if labels else metric
        child.inc(value)
    elif kind == "histogram":
        plain = {k: v for k, v in labels.items() if k != "le"}
        child = metric.labels(**plain) if plain else metric
        # Histogram internals: per-bucket (not cumulative) values and the sum.
        if name.endswith("_sum"):
            child._sum.inc(value)
        elif name.endswith("_bucket"):
            upper = float(labels["le"])
            idx = list(child._upper_bounds).index(upper)
            series = (name, *sorted(f"{k}={v}" for k, v in plain.items()))
            child._buckets[idx].inc(value - (below.get(series, 0.0) if idx else 0.0))
            below[series] = value


# -- the cluster-wide view (the console's /metrics) ------------------------------------


@dataclass(frozen=True)
class Published:
    role: str
    instance: str
    at: float
    metrics: list[dict[str, Any]]


def parse_published(raw: dict[bytes | str, bytes | str]) -> list[Published]:
    out = []
    for value in raw.values():
        try:
            data = json.loads(value)
            out.append(Published(data["role"], data["instance"], float(data["at"]),
                                 list(data["metrics"])))
        except (ValueError, KeyError, TypeError):
            continue  # one bad entry never hides the others
    return out


def families_from(published: Iterable[Published]) -> Iterator[Metric]:
    """The roles' metrics as Prometheus families, each sample labelled with its role and
    instance (sum them in PromQL for the cluster: `sum by (queue) (rate(...))`)."""
    families: dict[str, Metric] = {}
    for p in sorted(published, key=lambda x: (x.role, x.instance)):
        for fam in p.metrics:
            kind, name = fam["type"], fam["name"]
            extra = {"role": p.role, "instance": p.instance}
            if kind == "counter":
                family = families.setdefault(name, _family(CounterMetricFamily, name, fam))
                for sname, labels, value in fam["samples"]:
                    if sname.endswith("_total"):
                        family.add_sample(sname, {**labels, **extra}, value)
            elif kind == "histogram":
                family = families.setdefault(name, _family(HistogramMetricFamily, name, fam))
                for sname, labels, value in fam["samples"]:
                    family.add_sample(sname, {**labels, **extra}, value)
    yield from families.values()


def _family(cls: Any, name: str, fam: dict[str, Any]) -> Metric:
    family = cls(name, fam.get("help", ""), labels=[])
    family.samples = []
    return family


def gauge(name: str, doc: str, values: dict[tuple[tuple[str, str], ...], float]) -> Metric:
    """A gauge family from {((label, value), ...): number}."""
    family = GaugeMetricFamily(name, doc, labels=[])
    for labels, value in values.items():
        family.add_sample(name, dict(labels), float(value))
    return family


def counter(name: str, doc: str, values: dict[tuple[tuple[str, str], ...], float]) -> Metric:
    family = CounterMetricFamily(name.removesuffix("_total"), doc, labels=[])
    for labels, value in values.items():
        family.add_sample(name if name.endswith("_total") else f"{name}_total",
                          dict(labels), float(value))
    return family


def naming_problems(families: Iterable[Metric]) -> list[str]:
    """What breaks the naming rules in these families (empty: none). Used by the tests
    and safe to call on the console's output."""
    problems = []
    for family in families:
        if not family.name.startswith(f"{PREFIX}_"):
            problems.append(f"{family.name}: no {PREFIX}_ prefix")
        for unit in ("_ms", "_milliseconds", "_minutes", "_hours", "_bytes_kb"):
            if unit in family.name:
                problems.append(f"{family.name}: not a base unit")
        for s in family.samples:
            if family.type == "counter" and not s.name.endswith(("_total", "_created")):
                problems.append(f"{s.name}: counter without _total")
            for label in s.labels:
                if label in FORBIDDEN_LABELS:
                    problems.append(f"{s.name}: label {label} grows with the data")
                elif label not in ALLOWED_LABELS and label != "le":
                    problems.append(f"{s.name}: label {label} not in the allowed set")
    return problems


# One per process: the role sets it up before its loop starts (`setup`).
_CURRENT: RoleMetrics | None = None


def setup(role: str, instance: str) -> RoleMetrics:
    global _CURRENT
    _CURRENT = RoleMetrics(role, instance)
    return _CURRENT


def current() -> RoleMetrics:
    """The process's metrics; a process that set none up gets a throwaway set, so
    library code can observe unconditionally."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = RoleMetrics("process", "local")
    return _CURRENT


# -- the roles' observations --------------------------------------------------------------


async def beat(m: RoleMetrics, client: Any, key: str) -> None:
    """Publish `m` (resuming from this instance's last snapshot on the first call)."""
    if not getattr(m, "_resumed", False):
        m.resume(await client.hget(key, m.field))
        m._resumed = True  # type: ignore[attr-defined]
    await client.hset(key, m.field, json.dumps(m.snapshot()))


def submitted_at(task_id: str) -> float | None:
    """A task's submit time from its id (an ObjectId, as every sendscript producer makes
    it: second precision); None for ids given by other programs."""
    from bson import ObjectId
    from bson.errors import InvalidId

    try:
        return ObjectId(task_id).generation_time.timestamp()
    except (InvalidId, TypeError):
        return None


def observe_results(m: RoleMetrics, finals: Iterable[Any], records: dict[str, Any],
                    now: Any, *, succeeded: int, failed: int, retried: int) -> None:
    """A consumer batch's results: how many applied by outcome, and for each result of
    an attempt still open (a redelivery finds it closed) the device's run time (the
    result's timestamp minus the record's sent_at, or started_at if the result came
    first) and submit-to-result time."""
    m.results.labels("success").inc(succeeded)
    m.results.labels("failed").inc(max(0, failed))
    m.results.labels("retry").inc(retried)
    m.retries.labels("result").inc(retried)
    for msg in finals:
        record = records.get(msg.record_id)
        if record is None or str(record.status) not in RECORD_OPEN:
            continue
        result_s = msg.timestamp / 1000.0 if msg.timestamp else now.timestamp()
        # A fast device reports before its worker stamps sent_at: the record's start
        # (right before the POST) is the nearest time we have then.
        sent = record.sent_at or record.started_at
        if sent is not None:
            sent = sent if sent.tzinfo else sent.replace(tzinfo=now.tzinfo)
            m.device_run.observe(max(0.0, result_s - sent.timestamp()))
        start = submitted_at(record.task_id)
        if start is not None:
            outcome = "success" if str(msg.log_type) == "SUCCESS" else "failed"
            m.total_time.labels(outcome).observe(max(0.0, now.timestamp() - start))


def add_batch(m: RoleMetrics, saved: int, dead_lettered: int) -> None:
    m.logs_saved.inc(saved)
    m.dead_lettered.inc(dead_lettered)
