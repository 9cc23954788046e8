"""loguru set-up: one line per event, tagged with the process role and pid."""

from __future__ import annotations

import os
import sys

from loguru import logger

FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{extra[role]}:{extra[pid]}</cyan> {message}"
)


def configure(role: str, *, level: str = "INFO", json: bool = False) -> None:
    logger.remove()
    logger.configure(extra={"role": role, "pid": os.getpid()})
    if json:
        logger.add(sys.stderr, level=level.upper(), serialize=True, enqueue=False)
    else:
        logger.add(sys.stderr, level=level.upper(), format=FORMAT, colorize=None)
