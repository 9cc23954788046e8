"""Typed settings shared by every role: environment (`SENDSCRIPT_*`) and `.env`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sendscript import redis_url
from sendscript.keys import Keys
from sendscript.retry import RetryPolicy


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
    # A fan-out is stored this many devices a round at most, between the items behind
    # it; fewer while a chunk that size would hold the intake longer than the budget.
    intake_fanout_chunk: int = Field(500, ge=1, le=100_000)
    intake_fanout_budget_s: float = Field(0.25, ge=0, le=60)
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
    # The fleet view's `devices` documents are written at most this often by each
    # consumer, a device's results since the last write merged into one update
    # (sendscript/fleet.py, FleetBuffer); 0: every batch.
    fleet_write_interval_s: float = Field(5.0, ge=0, le=300)
    # A task log's `message` is stored cut to this many characters (a device that
    # logs megabytes must not make one document too large to store).
    task_log_max_message_chars: int = Field(65_536, ge=100)

    # Timeouts of external calls (seconds).
    central_connect_timeout_s: float = Field(3.0, gt=0)
    central_timeout_s: float = Field(10.0, gt=0)
    redis_timeout_s: float = Field(5.0, gt=0)
    # Durability across a Redis failover (sendscript/replicas.py): after each device
    # lock acquire and each intake push, WAIT until this many replicas hold the write,
    # at most redis_wait_timeout_ms; 0: off (replication stays asynchronous, and a
    # failover may lose the last acknowledged writes: docs/deploy.md). A lock not
    # confirmed in time is released and its task held; a producer's push raises.
    redis_min_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(1000, ge=1, le=60_000)
    mongo_timeout_s: float = Field(10.0, gt=0)
    # Writes acknowledged only once journaled (j=true): without it a crash of the
    # Mongo server loses writes it had acknowledged. Off only where the deployment's
    # write concern already journals (a replica set with w=majority).
    mongo_journal: bool = True
    # Write concern of every write (claims, status changes, exec records above all):
    # `auto` is w=majority on a replica set (a URL naming replicaSet=, several hosts or
    # mongodb+srv) and the server's default elsewhere; else `majority` or a number of
    # members. Read concern: `auto` is majority on a replica set, else local.
    mongo_write_concern: str = "auto"
    mongo_read_concern: str = "auto"
    # How long a Mongo step that may run twice (a compare-and-set, a claim, an exec
    # record) is retried in place through transient errors (a failover: not writable
    # primary, step-down, network) before it fails as any other error would.
    mongo_failover_s: float = Field(30.0, ge=0)
    pulsar_timeout_s: float = Field(10.0, gt=0)
    # Pulsar beyond one broker: SENDSCRIPT_PULSAR_URL may list brokers
    # (pulsar://h1:6650,h2:6650; pulsar+ssl:// for TLS). A token for token auth; the
    # CA bundle that signs the brokers' certificates; whether an untrusted certificate
    # or a hostname that does not match it is accepted (both: no).
    pulsar_token: str | None = None
    pulsar_tls_trust_certs: Path | None = None
    pulsar_tls_allow_insecure: bool = False
    pulsar_tls_validate_hostname: bool = True
    # A task log delivered this many times without an ack (negatively acknowledged or
    # its consumer died each time) goes to pulsar_dead_letter_topic through the
    # client's dead-letter policy (default `{task_log_topic}-{subscription}-DLQ`);
    # 0: redeliver forever. Logs the consumer refuses go to dead_letter_topic as before.
    pulsar_max_redeliveries: int = Field(16, ge=0)
    pulsar_dead_letter_topic: str | None = None

    # Scheduling.
    delay_horizon_s: float = Field(60.0, gt=0)  # waiting tasks due this soon are held in memory
    delay_load_interval_s: float = Field(20.0, gt=0)
    schedule_reload_s: float = Field(5.0, gt=0)
    misfire_grace_s: float = Field(2.0, ge=0)
    # Named queues: at most this many of a queue's tasks running at once, across every
    # master (master/queue_caps.py: slots in Redis) ("high=50,bulk=10"), and how long
    # a task may wait before it expires ("bulk=600").
    queues: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    queue_max_wait: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # Shares of dispatch turns between queues at one priority ("high=3"; default 1):
    # fan-out batches and queues take turns, so nothing waits behind a huge batch.
    queue_weights: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    expiry_check_interval_s: float = Field(1.0, gt=0)

    # Retries: a failed attempt waits base * factor^(attempt-1), capped, jittered.
    retry_base_s: float = Field(5.0, ge=0)
    retry_factor: float = Field(2.0, ge=1)
    retry_cap_s: float = Field(600.0, ge=0)
    retry_jitter: float = Field(0.2, ge=0, le=1)
    queue_retry_base_s: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    # ERROR log codes that mean "do not retry" (comma-separated).
    final_error_codes: Annotated[frozenset[str], NoDecode] = frozenset()

    # Recovery: the leader's sweeps (result timeouts, dead masters, orphans).
    leader_lease_s: float = Field(15.0, gt=0)
    sweep_interval_s: float = Field(5.0, gt=0)
    orphan_grace_s: float = Field(30.0, ge=0)
    # A task `running` this long whose device lock does not hold its attempt's fence
    # was never sent (its worker lost it half way): it goes back to pending.
    running_stuck_s: float = Field(60.0, gt=0)
    # A device lock no open attempt holds is released once seen orphaned this long
    # (longer than a worker may take between locking and recording its attempt).
    orphan_lock_grace_s: float = Field(30.0, ge=0)
    # Each master's own check (master/reconcile.py): a pending task it holds in Mongo
    # but not on its board, missing on looks this far apart, is queued again.
    reconcile_interval_s: float = Field(30.0, gt=0)
    reconcile_grace_s: float = Field(30.0, ge=0)

    # Worker recycling, like gunicorn's max_requests and PM2's max_memory_restart.
    worker_max_tasks: int = Field(0, ge=0)  # 0: never
    worker_max_memory_mb: float = Field(0.0, ge=0)  # 0: never

    # Retention of finished tasks, their records and logs: the leader master deletes
    # what is due every retention_sweep_s (master/retention.py; TTL indexes too).
    retention_success_s: float = Field(7 * 86400, gt=0)
    retention_failed_s: float = Field(30 * 86400, gt=0)
    retention_sweep_s: float = Field(60.0, gt=0)

    # Hung workers (gunicorn's worker timeout; see master/watchdog.py): a worker whose
    # pipe heartbeat is silent this long is killed (SIGKILL) and its tasks recovered
    # as a dead worker's. So is one holding a task longer than worker_task_timeout_s:
    # 0 derives that from the handler's steps and their timeouts; set, it must be
    # longer than that derived bound.
    worker_timeout_s: float = Field(30.0, gt=0)
    worker_task_timeout_s: float = Field(0.0, ge=0)

    # Submissions: the largest script accepted, as its BSON size in bytes
    # (what Mongo stores; at most its 16 MiB document limit), and how long a finished
    # task keeps its dedupe key (0: only while it is unfinished).
    max_script_bytes: int = Field(1024 * 1024, ge=1, le=16 * 1024 * 1024)
    dedupe_window_s: float = Field(86400.0, ge=0)

    # Pauses (sendscript/pauses.py): a lifted pause wakes the devices it held
    # at once; this is only the fallback re-ask of a held device. While the quota pause
    # is set, one task is let through this often as a probe (its success lifts it).
    pause_recheck_s: float = Field(10.0, gt=0)
    quota_probe_s: float = Field(30.0, gt=0)

    # Backpressure: a master stops taking from the ready list while it holds
    # high_water tasks (queued on its board plus delayed in its heap) and takes again
    # once down to low_water; 0 turns it off. Producers (SDK, `sendscript submit`)
    # refuse with QueueFull while the ready list holds ready_max items (0: no cap; a
    # soft cap, one LLEN before storing: concurrent producers overshoot by a batch).
    # The marks sit above common fan-out sizes: a task taken in is one fairness can
    # serve, while one left in Redis waits behind everything held (about 2 KiB each).
    high_water: int = Field(25_000, ge=0)
    low_water: int = Field(5_000, ge=0)
    ready_max: int = Field(0, ge=0)
    # Work sharing (master/sharing.py): while other masters are alive, a master takes
    # from the ready list only while its board holds fewer than this many tasks, and
    # leaves the rest to whichever master has room first. None: four times its send
    # slots (workers x worker_concurrency); 0: off (take up to high water, as alone).
    share_prefetch: int | None = Field(None, ge=0)

    # Alerts (sendscript/alerts.py, master/alerts.py): a WeCom group robot
    # (its full webhook URL, key included) and/or a JSON webhook; neither set: alerts
    # are only logged. At most alert_max_per_minute messages a minute in all (what is
    # dropped is said in the next one); each POST times out after alert_timeout_s and
    # is tried again alert_retries times; at most alert_queue_size wait to be sent.
    alert_wecom_url: str | None = None
    alert_webhook_url: str | None = None
    alert_max_per_minute: int = Field(20, ge=1)
    alert_timeout_s: float = Field(10.0, gt=0)
    alert_retries: int = Field(2, ge=0, le=10)
    alert_queue_size: int = Field(100, ge=1)
    # One message per incident across the cluster: its Redis record lives this long
    # unless a master that still sees the incident renews it.
    alert_claim_ttl_s: float = Field(3600.0, gt=0)
    # Incidents the master raises itself (master/watches.py), checked this often:
    # alert_worker_deaths workers dying unplanned within alert_worker_deaths_window_s
    # (over when none died for that long); the dead_lettered counter rising by
    # alert_dead_letters within alert_dead_letters_window_s (over when it stayed flat
    # that long); a master whose heartbeat is gone (over when it is back).
    alert_check_interval_s: float = Field(2.0, gt=0)
    alert_worker_deaths: int = Field(3, ge=1)
    alert_worker_deaths_window_s: float = Field(60.0, gt=0)
    alert_dead_letters: int = Field(1, ge=1)
    alert_dead_letters_window_s: float = Field(300.0, gt=0)
    # A master silent this long is gone (the leader says so); one restarted sooner is not.
    alert_master_gone_after_s: float = Field(30.0, ge=0)

    # Rate limits (sendscript/limits.py, master/limits.py), shared by every
    # master: at most MAX dispatches per DURATION for all tasks, a queue or a device
    # group: "global=20/1s,queue:bulk=5/2s,group:rack-7=1/1s" (ms, s, m, h). A task
    # over a limit waits (no attempt used, no error). Tokens are reserved in Redis at
    # most every rate_limit_tick_s while tasks wait; the master reloads the limited
    # groups' devices every rate_limit_groups_refresh_s.
    rate_limits: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    rate_limit_tick_s: float = Field(0.05, gt=0, le=10)
    rate_limit_groups_refresh_s: float = Field(30.0, gt=0)
    # No interval of a limit's duration holds more than its max, at the farm too, as
    # long as a dispatched task reaches central-control within this allowance (each
    # grant counts this much longer).
    rate_limit_send_allowance_s: float = Field(0.25, ge=0, le=10)
    # Adaptive limits ("global=20/1s~2..100", sendscript/adaptive.py): on a 429 (or a
    # mean send latency above rate_limit_adapt_latency_s, off when unset) the value is
    # multiplied by rate_limit_adapt_decrease, at most once a duration, and a 429's
    # Retry-After holds the limit on every master; while the limit holds tasks back
    # and no hold is in force it climbs along a cubic curve (back to just below the
    # value that drew the 429, then past it by rate_limit_adapt_step x that plateau
    # in 5 durations, ever faster). Each master looks every rate_limit_adapt_tick_s
    # (at once on a 429).
    rate_limit_adapt_decrease: float = Field(0.9, gt=0, lt=1)
    rate_limit_adapt_step: float = Field(0.02, gt=0, le=1)
    rate_limit_adapt_latency_s: float | None = Field(None, gt=0)
    rate_limit_adapt_tick_s: float = Field(0.25, gt=0, le=10)

    # Circuit breaker on central-control (sendscript/breaker.py,
    # master/breaker.py), one state shared by every master through Redis, merged every
    # breaker_sync_s. Over a sliding breaker_window_s holding at least
    # breaker_min_volume sends, a failure rate (unreachable, timeouts, 408/429/5xx) at
    # breaker_degrade_at degrades it (at most breaker_degraded_concurrency tasks in
    # flight per master) and below breaker_recover_below closes it again;
    # breaker_trip_after failures in a row open it: nothing is sent for the next pause
    # of breaker_pauses_s (one per trip in a row), then breaker_probes sends probe it
    # (re-armed if unanswered after breaker_probe_timeout_s).
    breaker_window_s: int = Field(60, ge=1)
    breaker_min_volume: int = Field(20, ge=1)
    breaker_degrade_at: float = Field(0.70, gt=0, le=1)
    breaker_recover_below: float = Field(0.35, ge=0, le=1)
    breaker_trip_after: int = Field(200, ge=1)
    breaker_pauses_s: Annotated[tuple[float, ...], NoDecode] = (10.0, 20.0, 40.0, 60.0)
    breaker_probes: int = Field(1, ge=1)
    breaker_probe_timeout_s: float = Field(30.0, gt=0)
    breaker_degraded_concurrency: int = Field(8, ge=1)
    breaker_sync_s: float = Field(0.5, gt=0, le=10)

    # Quota: central-control answering this HTTP status, or an error code
    # (its body's `code`/`errorCode`/`error_code`) among these, means its quota is
    # exhausted: no attempt used, the quota pause is set (quota_probe_s lifts it).
    central_quota_status: int | None = None
    central_quota_codes: Annotated[frozenset[str], NoDecode] = frozenset()

    # Drop-rate ladder (master/droprate.py), over a sliding drop_window_s shared by
    # every master, once it holds drop_min_volume finished tasks: tasks that will
    # never run (expired, or failed for good by a result timeout or by central-control
    # trouble; not an attempt that is retried) at drop_degrade_at of them degrade the
    # breaker, at drop_open_at open it, at drop_hard_stop_at set the hard stop (only
    # `sendscript resume --hard` lifts it). Merged every drop_sync_s.
    drop_window_s: int = Field(60, ge=1)
    drop_min_volume: int = Field(100, ge=1)
    drop_degrade_at: float = Field(0.10, gt=0, le=1)
    drop_open_at: float = Field(0.15, gt=0, le=1)
    drop_hard_stop_at: float = Field(0.20, gt=0, le=1)
    drop_sync_s: float = Field(1.0, gt=0, le=60)

    # Benching (sendscript/device_health.py, master/device_health.py): a device
    # whose last bench_after attempts failed (SYSTEM_ERROR results, result timeouts,
    # sends central-control refused for it) is benched, its tasks held by every master
    # without using attempts, for bench_cooldown_s, doubled per bench in a row up to
    # bench_cooldown_max_s; a success resets it, `sendscript device resume D` lifts
    # it. More than bench_alert_count devices benched at once is an incident.
    # bench_after = 0: never bench.
    bench_after: int = Field(3, ge=0)
    bench_cooldown_s: float = Field(60.0, gt=0)
    bench_cooldown_max_s: float = Field(900.0, gt=0)
    bench_alert_count: int = Field(10, ge=0)

    # Console (console/): where it listens (any address but a loopback one
    # needs an operator token in Mongo first), the cookie-signing secret (unset: one
    # shared through Mongo), how long a login lasts, the most tasks a bulk action may
    # change, how long its confirmation holds, how often live views refresh (counts of
    # tasks per status less often: an aggregate), how long the dead-letter read may take.
    console_host: str = "127.0.0.1"
    console_port: int = Field(8600, ge=0, le=65535)
    console_secret: str | None = None
    console_session_s: float = Field(12 * 3600, gt=0)
    console_bulk_max: int = Field(10_000, ge=1, le=1_000_000)
    console_confirm_ttl_s: float = Field(120.0, gt=0)
    console_live_interval_s: float = Field(1.0, gt=0)
    console_counts_s: float = Field(5.0, gt=0)
    console_task_stream_s: float = Field(0.5, gt=0)
    console_dlq_timeout_s: float = Field(3.0, gt=0)
    # Who may reach the HTTP roles. The Host names a request may carry (empty: the bind
    # address and localhost; `*` any): any other is refused before anything runs, so a
    # page whose name was rebound to this address cannot drive it. Open mode (no token
    # needed) only where console_open says so: `sendscript demo` sets it. Forwarded
    # headers (X-Forwarded-For / -Proto) are believed from trusted_proxies alone
    # (addresses or networks; empty: from nobody). Off loopback or behind a proxy,
    # /metrics wants `Authorization: Bearer` with metrics_token (or a console token).
    console_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    agents_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    console_open: bool = False
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    metrics_token: str | None = None

    # Pull-mode agents (agents/): the agents role's HTTP API. A lease lasts
    # agent_lease_s, each progress call extends it (never past the task's timeout_s
    # from its start); an agent silent for agent_ttl_s is lost and its leases go back
    # with their checkpoints. Lease calls wait up to agent_max_wait_s, look again every
    # agent_poll_interval_s, take at most agent_max_lease_batch tasks, and an agent may
    # make agent_lease_rate of them per second (burst agent_lease_burst). Checkpoints
    # and results are refused above their caps (bytes of JSON).
    agents_host: str = "127.0.0.1"
    agents_port: int = Field(8470, ge=0, le=65535)
    agent_lease_s: float = Field(30.0, gt=0)
    agent_ttl_s: float = Field(15.0, gt=0)
    agent_heartbeat_s: float = Field(5.0, gt=0)
    agent_max_wait_s: float = Field(30.0, ge=0)
    agent_poll_interval_s: float = Field(0.2, gt=0)
    agent_max_lease_batch: int = Field(50, ge=1, le=1000)
    agent_lease_rate: float = Field(20.0, gt=0)
    agent_lease_burst: int = Field(40, ge=1)
    agent_checkpoint_max_bytes: int = Field(65_536, ge=64)
    agent_result_max_bytes: int = Field(262_144, ge=64)
    agent_sweep_interval_s: float = Field(1.0, gt=0)
    agent_cors_origins: str = "*"

    # Monitoring. Task counts (sendscript/counts.py): buckets of
    # created_at this wide, the leader's pass this often, changes read again this
    # much later (clocks apart, writes in flight), a purged bucket recounted this long after
    # its purge time (the TTL monitor's lag), a bucket the keeper remembers read whole
    # again this often. Health endpoints (sendscript/health.py):
    # /healthz and /readyz on health_host at a port per role, 0 = off.
    counts_bucket_s: int = Field(10, ge=1, le=86400)
    counts_interval_s: float = Field(5.0, gt=0)
    counts_overlap_s: float = Field(15.0, ge=0)
    counts_purge_lag_s: float = Field(120.0, ge=0)
    counts_refresh_s: float = Field(60.0, gt=0)
    health_host: str = "127.0.0.1"
    master_health_port: int = Field(0, ge=0, le=65535)
    consumer_health_port: int = Field(0, ge=0, le=65535)

    log_level: str = "INFO"
    log_json: bool = False

    # Traces (sendscript/tracing.py; needs the `otel` extra): each role exports its
    # spans over OTLP/HTTP to otel_endpoint (a collector's traces URL) as service
    # `{otel_service_name}-{role}`; a trace begun at a submit is kept with this
    # probability (the processes after it follow that decision). Off: no cost.
    otel_enabled: bool = False
    otel_endpoint: str = "http://127.0.0.1:4318/v1/traces"
    otel_service_name: str = Field("sendscript", min_length=1, max_length=100)
    otel_sample_ratio: float = Field(1.0, ge=0, le=1)
    otel_timeout_s: float = Field(5.0, gt=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        """Checked here, so a URL no client can use stops a role at start, in one line."""
        if value is not None:
            redis_url.parse(value)
        return value

    @field_validator("mongo_write_concern")
    @classmethod
    def _write_concern(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "majority") and not value.isdigit():
            raise ValueError("auto, majority or a number of members (e.g. 1)")
        return value

    @field_validator("mongo_read_concern")
    @classmethod
    def _read_concern(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("auto", "majority", "local"):
            raise ValueError("auto, majority or local")
        return value

    @model_validator(mode="after")
    def _replicas_where_wait_works(self) -> Settings:
        # A cluster client sends WAIT to every primary on connections of their own,
        # never after the write on the connection that made it: it would prove nothing.
        if self.redis_min_replicas and self.redis_cluster:
            raise ValueError("SENDSCRIPT_REDIS_MIN_REPLICAS: WAIT needs redis:// or "
                             "redis+sentinel://; leave it 0 on redis+cluster://")
        return self

    @field_validator("breaker_pauses_s", mode="before")
    @classmethod
    def _pauses(cls, value: Any) -> Any:
        """`10,20,40,60` (the env form) or a sequence; at least one, each above 0."""
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        pauses = tuple(float(v) for v in value)
        if not pauses or min(pauses) <= 0:
            raise ValueError("breaker_pauses_s: one or more pauses above 0")
        return pauses

    @field_validator("console_hosts", "agents_hosts", "trusted_proxies", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        """`a,b,c` (the env form) or a sequence."""
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("final_error_codes", "central_quota_codes", mode="before")
    @classmethod
    def _codes(cls, value: Any) -> Any:
        if isinstance(value, str):
            return frozenset(c.strip() for c in value.split(",") if c.strip())
        return value

    @field_validator("queues", "queue_max_wait", "queue_weights", "queue_retry_base_s",
                     mode="before")
    @classmethod
    def _parse_pairs(cls, value: Any) -> Any:
        """`name=number,name=number` (the env form), a JSON object, or a mapping."""
        if not isinstance(value, str):
            return value
        if value.strip().startswith("{"):
            return json.loads(value)
        pairs: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            name, sep, number = part.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected name=number, got {part!r}")
            pairs[name.strip()] = number.strip()
        return pairs

    @field_validator("rate_limits", mode="before")
    @classmethod
    def _limits(cls, value: Any) -> Any:
        """Checked here, so a bad limit stops a role at start with the reason."""
        from sendscript.limits import parse_limits

        if isinstance(value, str) and value.strip().startswith("{"):
            value = json.loads(value)
        return {name: limit.rule for name, limit in parse_limits(value).items()}

    def to_env(self) -> dict[str, str]:
        """These settings as `SENDSCRIPT_*` variables, for a child process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, frozenset | set):
                value = ",".join(sorted(value))
            elif isinstance(value, tuple):
                value = ",".join(str(v) for v in value)
            env[f"SENDSCRIPT_{name.upper()}"] = str(value)
        return env

    def retry_policy(self, max_retries: int, queue: str,
                     base_s: float | None = None) -> RetryPolicy:
        """A task's policy: its own base delay, else its queue's, else the default."""
        return RetryPolicy(
            max_retries=max_retries,
            base_s=base_s if base_s is not None
            else self.queue_retry_base_s.get(queue, self.retry_base_s),
            factor=self.retry_factor, cap_s=self.retry_cap_s, jitter=self.retry_jitter,
        )

    @property
    def redelivery_dlq_topic(self) -> str:
        return (self.pulsar_dead_letter_topic
                or f"{self.task_log_topic}-{self.task_log_subscription}-DLQ")

    @property
    def dlq_topic(self) -> str:
        return self.dead_letter_topic or f"{self.task_log_topic}-DLQ"

    @property
    def redis_cluster(self) -> bool:
        return bool(self.redis_url) and redis_url.parse(self.redis_url or "").cluster

    @property
    def redis_prefix(self) -> str:
        """The prefix of every Redis key: `key_prefix`, in a hash tag on a cluster
        (`{sendscript}`) so that each Lua script and MULTI stays in one slot. Names
        outside Redis (Mongo documents, Pulsar topics) keep `key_prefix` as it is."""
        return redis_url.hash_tagged(self.key_prefix) if self.redis_cluster else self.key_prefix

    @property
    def keys(self) -> Keys:
        return Keys(self.redis_prefix)

    def require(self, *names: str) -> None:
        """Fail early, with the variable to set, when a role lacks a server URL."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            env = ", ".join(f"SENDSCRIPT_{n.upper()}" for n in missing)
            raise SystemExit(f"sendscript: set {env} (or use `sendscript up` for embedded servers)")


def settings_errors(exc: ValidationError) -> list[str]:
    """One line per refused setting, naming its variable: `SENDSCRIPT_X: why`."""
    lines = []
    for error in exc.errors():
        why = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:  # a check across settings names them itself
            lines.append(why)
            continue
        lines.append(f"SENDSCRIPT_{str(error['loc'][0]).upper()}: {why}")
    return lines
