"""The HTTP roles' server (console, agents): uvicorn that exits 0 when asked to stop."""

from __future__ import annotations

from typing import Any

import uvicorn


class GracefulServer(uvicorn.Server):
    """uvicorn raises SIGTERM / SIGINT again after its graceful shutdown, which
    supervisord reports as a death; a stop asked for ends with exit code 0 instead."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()
