"""Retry policy: which failures are worth another attempt, and when. Pure.

Retryable: central-control failures its client marks retryable (the one rule of
which HTTP statuses and transport errors those are, 409 included, lives in
`worker.central`), SYSTEM_ERROR logs, ERROR logs whose code is not marked
final, result timeouts. Final: what the client marks final, ERROR logs whose
code is marked final, and a task out of attempts. A retry waits
base * factor^(attempt-1), capped, with jitter.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sendscript.backoff import exponential_delay
from sendscript.models import LogType
from sendscript.status import TaskStatus, task_cas


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    base_s: float = 5.0
    factor: float = 2.0
    cap_s: float = 600.0
    jitter: float = 0.2

    def delay_s(self, attempt: int, rand: random.Random | None = None) -> float:
        """Wait before the attempt after attempt number `attempt` (1-based) failed."""
        return exponential_delay(attempt, base_s=self.base_s, factor=self.factor,
                                 cap_s=self.cap_s, jitter=self.jitter, rand=rand)


@dataclass(frozen=True)
class Decision:
    retry: bool
    reason: str
    run_at: datetime | None = None


def log_retryable(log_type: LogType, code: str | None, final_codes: frozenset[str]) -> bool:
    if log_type == LogType.SYSTEM_ERROR:
        return True
    return log_type == LogType.ERROR and (code is None or code not in final_codes)


def decide(policy: RetryPolicy, attempt: int, retryable: bool, reason: str, now: datetime,
           rand: random.Random | None = None) -> Decision:
    """After attempt `attempt` failed for `reason`: retry (and when) or fail for good."""
    if not retryable:
        return Decision(False, reason)
    if attempt >= policy.max_retries + 1:
        return Decision(False, f"{reason} (attempts exhausted: {attempt} of "
                               f"{policy.max_retries + 1})")
    wait = policy.delay_s(attempt, rand)
    return Decision(True, reason, now + timedelta(seconds=wait))


def failure_cas(
    task_id: str,
    frm: Iterable[TaskStatus],
    attempt: int,
    decision: Decision,
    now: datetime,
    *,
    master: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The compare-and-set that ends a failed attempt: retry_waiting at the decided
    time (held by `master`, or by nobody for any master to take), or failed."""
    if decision.retry:
        fields: dict[str, Any] = {"run_at": decision.run_at, "last_error": decision.reason}
        if master is not None:
            fields["master"] = master
        return task_cas(task_id, frm, TaskStatus.RETRY_WAITING, now, attempt=attempt,
                        set_=fields, unset=() if master is not None else ("master",))
    return task_cas(task_id, frm, TaskStatus.FAILED, now, attempt=attempt,
                    set_={"last_error": decision.reason})
