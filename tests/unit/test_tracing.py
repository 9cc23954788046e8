"""Traces: the stored context (pure), the no-ops when off, the master's wait spans."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import timedelta

import pytest
from loguru import logger
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from master.bus import Bus, Go, Hold
from master.events import TaskDispatched, TaskHeld, TasksQueued, TasksTaken, TasksWithdrawn
from master.intake import parse_item
from master.tracing import TaskTraces
from sendscript import tracing
from sendscript.dev.otlp import OtlpReceiver
from sendscript.models import (
    FanoutSpec,
    Task,
    TaskSpec,
    TaskTemplate,
    describe_error,
    utcnow,
)
from sendscript.schedules import Schedule, fire_tasks
from sendscript.settings import Settings

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# -- the stored context -------------------------------------------------------------
@pytest.mark.parametrize(("value", "ok"), [
    (PARENT, True),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", True),  # not sampled
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later", True),  # a new version
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", False),
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", False),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", False),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", False),
    ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", False),
    ("00-4bf92f35-00f067aa0ba902b7-01", False),
    ("", False),
])
def test_traceparent_is_checked_against_w3c(value: str, ok: bool) -> None:
    assert tracing.valid_traceparent(value) is ok


def test_carrier_round_trip_through_headers() -> None:
    stored = tracing.carrier_of(PARENT, "vendor=abc")
    assert stored == {"traceparent": PARENT, "tracestate": "vendor=abc"}
    assert tracing.headers(stored) == stored
    assert tracing.from_headers(tracing.headers(stored)) == stored
    assert tracing.trace_id(stored) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.carrier_of(PARENT) == {"traceparent": PARENT}
    assert tracing.carrier_of(None) is None and tracing.headers(None) == {}


def test_a_mangled_context_from_outside_costs_the_link_only() -> None:
    assert tracing.from_headers({"traceparent": "garbage"}) is None
    assert tracing.from_headers({}) is None and tracing.from_headers(None) is None
    assert tracing.trace_id({"traceparent": "garbage"}) is None
    with pytest.raises(ValueError, match="not a W3C"):
        tracing.carrier_of("garbage")


def test_a_spec_carries_its_context_into_the_task() -> None:
    spec = TaskSpec(device_id="d1", script={"id": "s"}, traceparent=PARENT, tracestate="k=v")
    task = Task.from_spec(spec)
    assert task.trace == {"traceparent": PARENT, "tracestate": "k=v"}
    assert task.to_doc()["trace"] == task.trace
    assert Task.from_spec(TaskSpec(device_id="d1", script={})).trace is None
    assert "trace" not in Task.from_spec(TaskSpec(device_id="d1", script={})).to_doc()
    fanout = FanoutSpec(device_ids=["a", "b"], script={}, traceparent=PARENT)
    assert Task.from_spec(fanout.for_device("a")).trace == {"traceparent": PARENT}


def test_a_malformed_traceparent_is_refused_with_its_reason() -> None:
    with pytest.raises(ValidationError) as info:
        TaskSpec.model_validate({"device_id": "d", "script": {}, "traceparent": "00-xyz"})
    assert describe_error(info.value).startswith("traceparent: not a W3C traceparent")
    # a raw queue item so refused is quarantined with that reason
    with pytest.raises(ValueError, match=r"^traceparent: not a W3C"):
        parse_item(json.dumps({"device_id": "d", "script": {}, "traceparent": "1"}).encode())


# -- off ------------------------------------------------------------------------------
def test_off_everything_is_a_no_op() -> None:
    assert tracing.ON is False
    assert tracing.setup(Settings(_env_file=None), "master") is False
    assert tracing.ON is False
    assert tracing.start("x", {"traceparent": PARENT}) is None
    assert tracing.begin_trace("x") is None
    assert tracing.entry_span("x", {"traceparent": PARENT}) is None
    assert tracing.carrier(None) is None
    tracing.record("x", {"traceparent": PARENT}, utcnow())
    tracing.end(None, {"a": 1}, error="e")
    tracing.shutdown()
    assert TaskTraces().subscriptions() == []  # the master's part subscribes to nothing


def test_off_a_caller_that_traces_still_passes_its_context_on() -> None:
    tracer = TracerProvider().get_tracer("caller")
    assert tracing.callers_context() is None  # no span current yet
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        passed = tracing.callers_context()
    assert passed is not None
    assert passed["traceparent"].split("-")[1:3] == [f"{ctx.trace_id:032x}",
                                                     f"{ctx.span_id:016x}"]
    assert tracing.callers_context() is None


# -- on -------------------------------------------------------------------------------
def test_setup_exports_a_roles_spans_and_shutdown_flushes_them() -> None:
    with OtlpReceiver() as receiver:
        settings = Settings(_env_file=None, otel_enabled=True,
                            otel_endpoint=receiver.endpoint)
        try:
            assert tracing.setup(settings, "worker-3") is True
            assert tracing.setup(settings, "master") is True  # once a process
            root = tracing.entry_span("sendscript.intake", {"traceparent": PARENT})
            assert tracing.trace_id(root) == tracing.trace_id({"traceparent": PARENT})
            span = tracing.start("sendscript.send", root, {"sendscript.attempt": 1,
                                                           "skipped": None})
            tracing.end(span, {"sendscript.outcome": "failed"}, error="HTTP 500")
        finally:
            tracing.shutdown()
        assert tracing.ON is False
        spans = {s.name: s for s in receiver.received()}
    intake, send = spans["sendscript.intake"], spans["sendscript.send"]
    assert intake.parent_id == "00f067aa0ba902b7"
    assert send.parent_id == intake.span_id and send.trace_id == intake.trace_id
    assert send.service == "sendscript-worker" and send.pid is not None
    assert send.attributes == {"sendscript.attempt": 1, "sendscript.outcome": "failed"}
    assert send.error and not intake.error


@pytest.fixture
def memory_tracer(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "ON", True)
    yield exporter


def traced_task(task_id: str, **extra: object) -> Task:
    return Task(_id=task_id, device_id="d1", script={}, trace={"traceparent": PARENT},
                **extra)


def test_the_master_records_queue_waits_and_each_gates_hold(
        memory_tracer: InMemorySpanExporter) -> None:
    bus, traces = Bus(), TaskTraces()
    bus.attach(traces)
    task, untraced = traced_task("t1"), Task(_id="t2", device_id="d2", script={})
    bus.emit(TasksQueued([task, untraced]))
    bus.emit(TaskHeld(task, Hold("paused (queue:q)", gate="PauseGate")))
    bus.emit(TaskHeld(task, Hold("paused (queue:q)", gate="PauseGate")))
    bus.emit(TaskHeld(task, Hold("rate limit global", gate="RateLimits")))
    bus.emit(TaskDispatched(task, "w0", 0.1))
    bus.emit(TaskDispatched(untraced, "w0", 0.1))
    spans = memory_tracer.get_finished_spans()
    assert [s.name for s in spans] == ["sendscript.wait.held", "sendscript.wait.held",
                                       "sendscript.wait.queued"]
    first, second, queued = spans
    assert (first.attributes["sendscript.gate"], first.attributes["sendscript.hold.times"]) \
        == ("PauseGate", 2)
    assert second.attributes["sendscript.gate"] == "RateLimits"
    assert first.end_time <= second.start_time and second.end_time <= queued.end_time
    # a first attempt due at once waited from its creation (the ready list included)
    assert queued.start_time == int(task.created_at.timestamp() * 1e9)
    assert all(f"{s.parent.span_id:016x}" == "00f067aa0ba902b7" for s in spans)
    assert traces.report()["tracing"]["waiting"] == 0


def test_the_master_records_a_retrys_delay_and_a_withdrawal(
        memory_tracer: InMemorySpanExporter) -> None:
    bus, traces = Bus(), TaskTraces()
    bus.attach(traces)
    now = utcnow()
    retry = traced_task("t1", attempt=1, updated_at=now - timedelta(seconds=2), run_at=now)
    bus.emit(TasksTaken([retry], "delayed"))
    bus.emit(TasksQueued([retry]))
    bus.emit(TasksWithdrawn([retry], "expired"))
    delayed, queued = memory_tracer.get_finished_spans()
    assert delayed.name == "sendscript.wait.delayed"
    assert delayed.attributes["sendscript.wait.kind"] == "retry"
    assert delayed.start_time == int(retry.updated_at.timestamp() * 1e9)
    assert queued.attributes["sendscript.withdrawn"] == "expired"
    assert not queued.status.is_ok


def test_the_bus_names_the_gate_that_held_without_changing_equality() -> None:
    class PauseGate:
        def admit(self, task: Task, now: object) -> Hold:
            return Hold("paused", 0.5)

    class Open:
        def admit(self, task: Task, now: object) -> Go:
            return Go()

    bus = Bus()
    bus.add_gate(Open())
    bus.add_gate(PauseGate())
    verdict = bus.admit(Task(_id="t", device_id="d", script={}), utcnow())
    assert verdict == Hold("paused", 0.5) and verdict.gate == "PauseGate"


def test_a_schedules_fire_is_one_trace_for_its_tasks(
        memory_tracer: InMemorySpanExporter) -> None:
    schedule = Schedule(_id="nightly", interval_s=60, template=TaskTemplate(script={}),
                        device_ids=["a", "b"])
    now = utcnow()
    tasks = fire_tasks(schedule, now, ["a", "b"], "p", "m1", now)
    (fire,) = memory_tracer.get_finished_spans()
    assert fire.name == "sendscript.schedule_fire" and fire.parent is None
    assert [t.trace for t in tasks] == [tasks[0].trace] * 2
    assert tracing.trace_id(tasks[0].trace) == f"{fire.context.trace_id:032x}"


def test_off_a_schedules_fire_carries_no_trace() -> None:
    schedule = Schedule(_id="nightly", interval_s=60, template=TaskTemplate(script={}),
                        device_ids=["a"])
    now = utcnow()
    assert fire_tasks(schedule, now, ["a"], "p", None, now)[0].trace is None


def test_without_the_extra_tracing_stays_off_with_a_warning(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                        None)
    warnings: list[str] = []
    handler = logger.add(warnings.append, level="WARNING")
    try:
        on = tracing.setup(Settings(_env_file=None, otel_enabled=True), "master")
    finally:
        logger.remove(handler)
    assert on is False and tracing.ON is False
    assert any("otel extra is not installed" in w for w in warnings)
