"""The Pulsar client's own log, told through loguru: an outage once, its end once.

The C++ client retries a lost broker by itself and logs every failed try; here
the first warning or error says the broker is away, the next "Connected to
broker" says it is back, and everything else goes to debug.
"""

from __future__ import annotations

import logging

from loguru import logger

from sendscript.backoff import OutageLog


class _Bridge(logging.Handler):
    def __init__(self, what: str) -> None:
        super().__init__(logging.DEBUG)
        self.outage = OutageLog(what)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.outage.failed(message)
        elif "Connected to broker" in message:
            self.outage.ok()
        else:
            logger.debug("pulsar: {}", message)


def pulsar_logger(what: str) -> logging.Logger:
    """A logger to give `pulsar.Client(logger=...)`."""
    log = logging.getLogger(f"sendscript.pulsar.{what}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        log.addHandler(_Bridge(f"{what}: pulsar broker"))
    return log
