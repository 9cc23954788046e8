"""Typed settings shared by every role: environment (`SENDSCRIPT_*`) and `.env`."""

from __future__ import annotations

import socket
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from sendscript.keys import Keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SENDSCRIPT_", env_file=".env", extra="ignore", frozen=False
    )

    # Servers. Unset means "embedded" for `sendscript up`; every other role needs them set.
    redis_url: str | None = None
    mongo_url: str | None = None
    pulsar_url: str | None = None
    central_url: str | None = None

    key_prefix: str = "sendscript"
    task_log_topic: str = "persistent://public/default/adbnode-task-log"
    task_log_subscription: str = "sendscript"
    dead_letter_topic: str | None = None
    data_dir: Path = Path(".sendscript")

    # Master and workers.
    master_id: str = Field(default_factory=socket.gethostname)
    workers: int = Field(2, ge=1, le=64)
    worker_concurrency: int = Field(32, ge=1, le=1000)
    intake_batch: int = Field(200, ge=1, le=10_000)
    lock_margin_s: float = Field(60.0, gt=0)
    free_check_interval_s: float = Field(5.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(30.0, ge=0)
    worker_restart_backoff_max_s: float = Field(30.0, gt=0)

    # Consumer.
    consumer_batch: int = Field(200, ge=1, le=10_000)
    consumer_batch_wait_ms: int = Field(20, ge=0)
    consumer_nack_delay_ms: int = Field(1000, ge=10)

    # Timeouts of external calls (seconds).
    central_connect_timeout_s: float = Field(3.0, gt=0)
    central_timeout_s: float = Field(10.0, gt=0)
    redis_timeout_s: float = Field(5.0, gt=0)
    mongo_timeout_s: float = Field(10.0, gt=0)
    pulsar_timeout_s: float = Field(10.0, gt=0)

    log_level: str = "INFO"
    log_json: bool = False

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.task_log_topic}-DLQ"

    @cached_property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    def require(self, *names: str) -> None:
        """Fail early, with the variable to set, when a role lacks a server URL."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            env = ", ".join(f"SENDSCRIPT_{n.upper()}" for n in missing)
            raise SystemExit(f"sendscript: set {env} (or use `sendscript up` for embedded servers)")
