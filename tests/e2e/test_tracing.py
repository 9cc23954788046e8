"""End-to-end traces: every role exports its spans to an OTLP/HTTP receiver this test
runs, and each task's spans form one trace from its submit to its result applied,
across the producer, the master, a worker and the consumer, retries included."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sendscript import tracing
from sendscript.client import SendScriptClient
from sendscript.dev.otlp import OtlpReceiver, ReceivedSpan
from sendscript.settings import Settings
from tests.support import Inspect, Roles, wait_for

pytestmark = pytest.mark.e2e

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
RAW_TRACEPARENT = f"00-{CALLER_TRACE[::-1]}-00f067aa0ba902b7-01"


@pytest.fixture
def receiver(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """The receiver, and the test's settings pointed at it (the roles and the SDK)."""
    with OtlpReceiver() as otlp:
        settings.otel_enabled = True
        settings.otel_endpoint = otlp.endpoint
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export soon after a span
        yield otlp
    tracing.shutdown()  # this process's SDK tracer: no other test inherits it


def spec(device: str, **extra: object) -> dict:
    return {"device_id": device, "script": {"id": "tap"}, **extra}


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_ns)


def test_one_trace_per_task_across_the_processes_with_a_retry(
        settings: Settings, receiver: OtlpReceiver, roles: Roles, inspect: Inspect) -> None:
    roles.simulator(run_ms=40, jitter=0)
    roles.consumer()
    roles.master(workers=1)  # with the producer and the consumer: four processes
    roles.configure_farm(device_outcomes={"dev-retry": "ERROR"})
    with SendScriptClient(settings) as client:
        # A caller that traces with its own provider: the task continues its trace.
        from opentelemetry.sdk.trace import TracerProvider

        caller = TracerProvider().get_tracer("producer")
        with caller.start_as_current_span("caller's request") as outer:
            in_caller = client.submit("dev-a", {"id": "tap"}).task_id
        assert f"{outer.get_span_context().trace_id:032x}" != CALLER_TRACE
        caller_trace = f"{outer.get_span_context().trace_id:032x}"
        retried = client.submit("dev-retry", {"id": "tap"}, max_retries=2,
                                retry_base_s=0.3).task_id
        # The device fails the first run only: decided when the run starts.
        wait_for(lambda: any(r["task_id"] == retried for r in roles.farm("runs")), 20,
                 "the first run of the retried task")
        roles.configure_farm(device_outcomes={})
        wait_for(lambda: inspect.count("success") == 2, 30, "two successes")

        # A farm that drops the context: the consumer links by record id.
        roles.configure_farm(keep_trace=False)
        client.pause(queue="gated", reason="tracing test")
        held = client.submit("dev-b", {"id": "tap"}, queue="gated").task_id
        inspect.redis.lpush(settings.keys.ready, json.dumps(
            spec("dev-c", traceparent=RAW_TRACEPARENT)))
        wait_for(lambda: inspect.count("success") == 3, 30, "the raw item's success")
        wait_for(lambda: inspect.db.script_tasks.find_one({"_id": held})["status"] == "pending"
                 and _held_once(settings, inspect), 10, "the paused task held")
        client.resume(queue="gated")
        wait_for(lambda: inspect.count("success") == 4, 30, "the held task's success")

    tasks = {t["_id"]: t for t in inspect.db.script_tasks.find()}
    raw = next(t for t in tasks.values() if t["device_id"] == "dev-c")
    trace_of = {tid: tracing.trace_id(t.get("trace")) for tid, t in tasks.items()}
    assert all(trace_of.values()), trace_of
    assert len(set(trace_of.values())) == 4, "one trace per task"
    assert trace_of[in_caller] == caller_trace, "the submit continued the caller's trace"
    assert trace_of[raw["_id"]] == RAW_TRACEPARENT.split("-")[1], "a raw item's context"

    def complete(task_id: str, results: int) -> bool:
        spans = receiver.traces().get(trace_of[task_id], [])
        return len(named(spans, "sendscript.result")) >= results
    for task_id in tasks:
        wait_for(lambda t=task_id: complete(t, 2 if t == retried else 1), 20,
                 f"the spans of task {task_id}")
    traces = receiver.traces()
    runs = roles.farm("runs")

    for task_id, trace_id in trace_of.items():
        spans = traces[trace_id]
        assert {s.attributes.get("sendscript.task_id") for s in spans} == {task_id}
        by_id = {s.span_id: s for s in spans}
        services = {s.service for s in spans}
        assert {"sendscript-master", "sendscript-worker", "sendscript-consumer"} <= services
        assert len({s.pid for s in spans}) >= 3, "at least three processes"
        queued = named(spans, "sendscript.wait.queued")
        sends = named(spans, "sendscript.send")
        results = named(spans, "sendscript.result")
        assert queued and sends and results and named(spans, "sendscript.device.run")
        root = (named(spans, "sendscript.submit") or named(spans, "sendscript.intake"))[0]
        for span in queued + sends:  # every attempt's spans are children of the root
            assert span.parent_id == root.span_id, span
        for result in results:  # the result's parent is the send that started the run
            assert by_id[result.parent_id].name == "sendscript.send"
        # central-control got the send's context as a W3C traceparent header
        task_runs = [r for r in runs if r["task_id"] == task_id]
        assert len(task_runs) == len(sends)
        for run, send in zip(task_runs, sends, strict=True):
            version, run_trace, parent, flags = run["trace"]["traceparent"].split("-")
            assert (version, run_trace, parent) == ("00", trace_id, send.span_id)
            assert int(flags, 16) & 1, "sampled"

    assert named(traces[trace_of[in_caller]], "sendscript.submit")[0].service == "sendscript-sdk"
    assert named(traces[trace_of[raw["_id"]]], "sendscript.intake")[0].parent_id == \
        RAW_TRACEPARENT.split("-")[2]

    retry_spans = traces[trace_of[retried]]
    sends = named(retry_spans, "sendscript.send")
    assert [s.attributes["sendscript.attempt"] for s in sends] == [1, 2]
    results = named(retry_spans, "sendscript.result")
    assert [r.attributes["sendscript.log_type"] for r in results] == ["ERROR", "SUCCESS"]
    assert [r.error for r in results] == [True, False]
    assert [r.parent_id for r in results] == [s.span_id for s in sends]
    delayed = named(retry_spans, "sendscript.wait.delayed")
    assert [d.attributes["sendscript.wait.kind"] for d in delayed] == ["retry"]

    # The farm kept the context (message properties) at first, then dropped it.
    from_message = {t: {r.attributes["sendscript.trace_from"]
                        for r in named(traces[trace_of[t]], "sendscript.result")}
                    for t in tasks}
    assert from_message[in_caller] == {"message"} and from_message[retried] == {"message"}
    assert from_message[held] == {"record"} and from_message[raw["_id"]] == {"record"}

    holds = named(traces[trace_of[held]], "sendscript.wait.held")
    assert holds and holds[0].attributes["sendscript.gate"] == "PauseGate"
    assert "paused" in holds[0].attributes["sendscript.hold.reason"]
    assert holds[0].end_ns <= named(traces[trace_of[held]], "sendscript.send")[0].start_ns
    assert receiver.refused == 0


def _held_once(settings: Settings, inspect: Inspect) -> bool:
    stats = inspect.redis.hgetall(settings.keys.masters)
    return any(json.loads(v).get("events", {}).get("TaskHeld") for v in stats.values())
