"""A tiny OTLP/HTTP traces receiver for tests and benchmarks: keeps the spans it gets.

`POST /v1/traces` with an `ExportTraceServiceRequest` (protobuf, as the OTLP/HTTP
exporter sends it) is decoded into `ReceivedSpan`s, each with the service and the pid
of the process that sent it. A stdlib HTTP server on a thread of its own, so a test
reads what every role exported while the roles run. Needs the `otel` extra.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    service: str
    pid: int | None
    error: bool
    attributes: dict[str, Any] = field(default_factory=dict)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one OTLP/HTTP protobuf export request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Status

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for rs in request.resource_spans:
        resource = {a.key: _value(a.value) for a in rs.resource.attributes}
        pid = resource.get("process.pid")
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_id=s.parent_span_id.hex(), name=s.name,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    service=str(resource.get("service.name", "")),
                    pid=int(pid) if pid is not None else None,
                    error=s.status.code == Status.STATUS_CODE_ERROR,
                    attributes={a.key: _value(a.value) for a in s.attributes}))
    return spans


class OtlpReceiver:
    """Started on 127.0.0.1 at a free port; `endpoint` is what the exporters are given."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.refused = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                try:
                    spans = decode(body) if self.path.rstrip("/") == "/v1/traces" else None
                except Exception:
                    spans = None
                with receiver._lock:
                    receiver.requests += 1
                    if spans is None:
                        receiver.refused += 1
                    else:
                        receiver.spans.extend(spans)
                self.send_response(200 if spans is not None else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1/traces"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def received(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self.spans)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """The spans received so far, by trace id."""
        out: dict[str, list[ReceivedSpan]] = {}
        for span in self.received():
            out.setdefault(span.trace_id, []).append(span)
        return out

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
