"""What every sendscript process sets up before it works."""

from __future__ import annotations

from sendscript import log, tracing
from sendscript.settings import Settings
from sendscript.status import configure_retention


def setup(settings: Settings, role: str) -> None:
    log.configure(role, level=settings.log_level, json=settings.log_json)
    configure_retention(settings.retention_success_s, settings.retention_failed_s,
                        settings.dedupe_window_s)
    tracing.setup(settings, role)  # a no-op unless SENDSCRIPT_OTEL_ENABLED
