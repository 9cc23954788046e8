"""The Pulsar client's own log, told through loguru: an outage once, its end once.

The C++ client retries a lost broker by itself and logs every failed try; here
the first warning or error says the broker is away, the next "Connected to
broker" says it is back, and everything else goes to debug.

The log is also the only place where some outcomes show at once (a broker that
keeps refusing a subscription, for one): a listener given to `pulsar_logger`
sees every line first. It is called on the client's own threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from loguru import logger

from sendscript.backoff import OutageLog

# (level, message), on a thread of the C++ client: hand over, never block.
Listener = Callable[[int, str], None]


class _Bridge(logging.Handler):
    def __init__(self, what: str) -> None:
        super().__init__(logging.DEBUG)
        self.outage = OutageLog(what)
        self.listener: Listener | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        listener = self.listener
        if listener is not None:
            try:
                listener(record.levelno, message)
            except Exception as exc:  # a listener's fault must not silence the log
                logger.debug("pulsar log listener failed: {!r}", exc)
        if record.levelno >= logging.WARNING:
            self.outage.failed(message)
        elif "Connected to broker" in message:
            self.outage.ok()
        else:
            logger.debug("pulsar: {}", message)


def pulsar_logger(what: str, listener: Listener | None = None) -> logging.Logger:
    """A logger to give `pulsar.Client(logger=...)`. One per `what`: a listener given
    here replaces the one given before (a role builds one client at a time)."""
    log = logging.getLogger(f"sendscript.pulsar.{what}")
    log.setLevel(logging.INFO)
    log.propagate = False
    bridges = [h for h in log.handlers if isinstance(h, _Bridge)]
    if not bridges:
        bridges = [_Bridge(f"{what}: pulsar broker")]
        log.addHandler(bridges[0])
    if listener is not None:
        bridges[0].listener = listener
    return log
