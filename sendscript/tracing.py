"""End-to-end traces of tasks (OpenTelemetry), optional and off by default.

A task carries its trace context (`Task.trace`: W3C `traceparent` and, when there is
one, `tracestate`) from the submit that started it (or the caller's span it
continued) through every process it crosses; each process records its spans as
children of that context, so a task's queue waits, holds, sends, retries and result
form one trace. Turned on per process by `SENDSCRIPT_OTEL_ENABLED` with the `otel`
extra installed (`pip install 'sendscript[otel]'`): a tracer provider with a batch
processor exporting over OTLP/HTTP to `SENDSCRIPT_OTEL_ENDPOINT`, set up once at start
(`setup`) and flushed at stop (`shutdown`).

Off (the default), or with the extra missing, every function here returns at once:
callers on a hot path check `tracing.ON` (one attribute read) before they build
anything for a span. OpenTelemetry is imported only by `setup`, so the core runs
without it installed.

This module keeps its own provider rather than the process-global one: the SDK runs
inside producers that may trace with their own, and their spans still parent ours
through the current context.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from sendscript.settings import Settings

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
Carrier = dict[str, str]  # {"traceparent": ..., "tracestate": ...}: what a task stores

# W3C Trace Context, version 00 (a later version may append fields, so it is not
# anchored at the end for them): version-traceid-parentid-flags, lowercase hex.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_WORKER_NUMBER = re.compile(r"-\d+$")
MAX_TRACESTATE = 512  # the W3C limit a vendor may still truncate to

ON = False  # read on hot paths: True once `setup` installed a provider in this process
_tracer: Any = None
_provider: Any = None
_role = ""


# -- the context a task carries (pure) ------------------------------------------------
def valid_traceparent(value: str) -> bool:
    """Is `value` a W3C traceparent: known layout, ids not all zero, version not ff."""
    m = _TRACEPARENT.match(value)
    if m is None:
        return False
    version, trace_id, span_id, _, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return False
    return trace_id != "0" * 32 and span_id != "0" * 16


def carrier_of(traceparent: str | None, tracestate: str | None = None) -> Carrier | None:
    """The stored form of a context given as headers; None when there is none."""
    if not traceparent:
        return None
    if not valid_traceparent(traceparent):
        raise ValueError(f"traceparent is not a W3C trace context: {traceparent[:80]!r}")
    carrier = {TRACEPARENT: traceparent}
    if tracestate:
        carrier[TRACESTATE] = tracestate[:MAX_TRACESTATE]
    return carrier


def trace_id(carrier: Mapping[str, str] | None) -> str | None:
    """The 32-hex trace id a stored context names, or None."""
    value = (carrier or {}).get(TRACEPARENT, "")
    return value.split("-")[1] if valid_traceparent(value) else None


def headers(carrier: Mapping[str, str] | None) -> dict[str, str]:
    """HTTP headers (or Pulsar properties) that pass a stored context on."""
    if not carrier or TRACEPARENT not in carrier:
        return {}
    return {k: carrier[k] for k in (TRACEPARENT, TRACESTATE) if carrier.get(k)}


def from_headers(values: Mapping[str, str] | None) -> Carrier | None:
    """A context read from headers or message properties; None if absent or malformed
    (a farm that mangles it costs the link, never the result)."""
    if not values:
        return None
    try:
        return carrier_of(values.get(TRACEPARENT), values.get(TRACESTATE))
    except ValueError:
        return None


# -- setting up and stopping ---------------------------------------------------------
def service_name(settings: Settings, role: str) -> str:
    """`sendscript-master`, `sendscript-worker`, ...: the role without a worker's number."""
    return f"{settings.otel_service_name}-{_WORKER_NUMBER.sub('', role)}"


def setup(settings: Settings, role: str) -> bool:
    """Install this process's tracer when the settings turn tracing on; True if on.
    Once per process: a second call (another client in the same producer) keeps the
    first provider."""
    global ON, _tracer, _provider, _role
    if ON or not settings.otel_enabled:
        return ON
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        logger.warning("SENDSCRIPT_OTEL_ENABLED is set but the otel extra is not installed "
                       "(pip install 'sendscript[otel]'): tracing stays off ({})", exc)
        return False
    resource = Resource.create({
        "service.name": service_name(settings, role),
        "service.namespace": settings.otel_service_name,
        "service.instance.id": f"{socket.gethostname()}:{os.getpid()}",
        "process.pid": os.getpid(),
        "sendscript.role": role,
    })
    provider = TracerProvider(
        resource=resource,
        # A task's spans follow the decision made where its trace began.
        sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)),
    )
    exporter = OTLPSpanExporter(endpoint=settings.otel_endpoint,
                                timeout=settings.otel_timeout_s)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider, _tracer, _role = provider, provider.get_tracer("sendscript"), role
    ON = True
    logger.info("tracing on: spans of {} to {}", resource.attributes["service.name"],
                settings.otel_endpoint)
    return True


def shutdown(timeout_s: float = 5.0) -> None:
    """Export what is still buffered, then stop; a no-op when tracing is off."""
    global ON, _tracer, _provider
    provider, ON, _tracer, _provider = _provider, False, None, None
    if provider is None:
        return
    try:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()
    except Exception as exc:  # the collector is gone: its spans with it, never the stop
        logger.warning("tracing: spans not flushed at stop: {!r}", exc)


# -- spans ----------------------------------------------------------------------------
def _context(carrier: Mapping[str, str] | None) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(dict(carrier or {}))


def _ns(when: datetime | int | None) -> int | None:
    if when is None or isinstance(when, int):
        return when
    return int(when.timestamp() * 1e9)


def start(name: str, parent: Mapping[str, str] | None, attrs: Mapping[str, Any] | None = None,
          start_at: datetime | int | None = None) -> Span | None:
    """A span of a task, child of its stored context; None when off or no context."""
    if not ON or not parent:
        return None
    return _tracer.start_span(name, context=_context(parent), attributes=_clean(attrs),
                              start_time=_ns(start_at))


def end(span: Span | None, attrs: Mapping[str, Any] | None = None, *,
        error: str | None = None, end_at: datetime | int | None = None) -> None:
    if span is None:
        return
    if attrs:
        span.set_attributes(_clean(attrs))
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error[:500]))
    span.end(end_time=_ns(end_at))


def record(name: str, parent: Mapping[str, str] | None, start_at: datetime | int,
           end_at: datetime | int | None = None, attrs: Mapping[str, Any] | None = None,
           error: str | None = None) -> None:
    """A span recorded after the fact (a wait whose start is known when it ends)."""
    span = start(name, parent, attrs, start_at)
    end(span, error=error, end_at=end_at)


def carrier(span: Span | None) -> Carrier | None:
    """The context of `span` in the stored form: what its children's processes get."""
    if span is None:
        return None
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    out = {TRACEPARENT: f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"}
    state = ctx.trace_state.to_header() if ctx.trace_state else ""
    if state:
        out[TRACESTATE] = state
    return out


def begin_trace(name: str, given: Mapping[str, str] | None = None,
                attrs: Mapping[str, Any] | None = None) -> Span | None:
    """The span a task's trace starts from (the submit): child of `given` (a context the
    producer passed along) or of the caller's current span, else a new trace."""
    if not ON:
        return None
    from opentelemetry import context as otel_context

    ctx = _context(given) if given else otel_context.get_current()
    return _tracer.start_span(name, context=ctx, attributes=_clean(attrs))


def entry_span(name: str, given: Mapping[str, str] | None,
               attrs: Mapping[str, Any] | None = None) -> Carrier | None:
    """A task's first span here (ended at once), child of the context it came with or
    of a new trace: the context its later spans join. None when off."""
    span = begin_trace(name, given, attrs)
    end(span)
    return carrier(span)


def callers_context() -> Carrier | None:
    """With tracing off here, the caller's current span if the caller traces with
    OpenTelemetry (already imported by it): the task still joins the caller's trace,
    for roles that trace. Never imports OpenTelemetry itself."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return None
    return carrier(api.get_current_span())


def _clean(attrs: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Attributes OpenTelemetry accepts: None dropped, other odd values as text."""
    if not attrs:
        return None
    return {k: v if isinstance(v, str | bool | int | float) else str(v)
            for k, v in attrs.items() if v is not None}
