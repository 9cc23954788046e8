"""What the agents API decides without I/O: who may lease what, tokens, sizes, budgets.

Pure functions over plain documents, so the rules are unit-tested on their own.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sendscript.models import ANY_DEVICE


@dataclass(frozen=True, slots=True)
class AgentView:
    """A registered agent as lease decisions need it. `anywhere`: it may lease tasks
    that name no device (an agent whose token has a scope may not)."""

    id: str
    labels: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    anywhere: bool = True


def eligible(task: dict[str, Any], agent: AgentView) -> bool:
    """An agent may lease a task that names one of its devices, or none (unless its
    token is scoped), and whose labels it all carries."""
    device = task.get("device_id", ANY_DEVICE)
    if device == ANY_DEVICE:
        if not agent.anywhere:
            return False
    elif device not in agent.devices:
        return False
    return set(task.get("labels") or ()) <= agent.labels


# -- token scopes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scope:
    """The devices a token's agents may serve: ids starting with one of `prefixes`, or
    members of one of `groups` (`members`: those groups' devices, read when the token
    was checked). No prefix and no group: every device, and tasks naming none."""

    prefixes: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    members: frozenset[str] = frozenset()

    @property
    def unlimited(self) -> bool:
        return not self.prefixes and not self.groups

    def allows(self, device: str) -> bool:
        return self.unlimited or device in self.members or any(
            device.startswith(p) for p in self.prefixes)

    def outside(self, devices: list[str] | frozenset[str]) -> list[str]:
        """The devices this scope does not cover, sorted."""
        return sorted(d for d in devices if not self.allows(d))

    def narrow(self, agent: AgentView) -> AgentView:
        """The agent as its token may act now: devices outside the scope dropped (a
        group may have lost members since it registered), no device-less tasks."""
        if self.unlimited:
            return agent
        return AgentView(agent.id, agent.labels,
                         frozenset(d for d in agent.devices if self.allows(d)), anywhere=False)

    def describe(self) -> str:
        parts = [f"{p}*" for p in self.prefixes] + [f"group:{g}" for g in self.groups]
        return ",".join(parts) or "all devices"


def one_per_device(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the first task of each device (a device runs one task at a time); tasks
    that name no device all stay."""
    seen: set[str] = set()
    out = []
    for task in tasks:
        device = task.get("device_id", ANY_DEVICE)
        if device != ANY_DEVICE:
            if device in seen:
                continue
            seen.add(device)
        out.append(task)
    return out


# -- lease tokens ----------------------------------------------------------------------
# A token names its exec record and device-lock fence, so completing, failing or
# releasing needs no read to find them; the random tail makes it unguessable. The
# token is checked by the compare-and-set itself (the task's lease.token must equal it).


def new_token(record_id: str, fence: int) -> str:
    return f"{record_id}.{fence}.{secrets.token_urlsafe(12)}"


@dataclass(frozen=True, slots=True)
class TokenParts:
    record_id: str
    fence: int


def parse_token(token: str) -> TokenParts | None:
    parts = token.split(".")
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
        return None
    return TokenParts(parts[0], int(parts[1]))


# -- sizes and deadlines ------------------------------------------------------------------


def json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def merge_checkpoint(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A progress call's checkpoint merged over the saved one (top-level keys; a key
    set to null is removed)."""
    merged = dict(old or {})
    for key, value in new.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def lease_deadline(now: datetime, lease_s: float, cap: datetime) -> datetime:
    """A lease lasts lease_s from now, never past its hard cap."""
    return min(now + timedelta(seconds=lease_s), cap)


# -- per-agent call budget ------------------------------------------------------------------


@dataclass
class Bucket:
    tokens: float
    at: float


@dataclass
class RateBudget:
    """A token bucket per agent: `rate` calls a second, bursts of `burst`."""

    rate: float
    burst: int
    buckets: dict[str, Bucket] = field(default_factory=dict)

    def take(self, key: str, now: float | None = None) -> float:
        """0 if the call may go now, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate
