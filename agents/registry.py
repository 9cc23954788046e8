"""The agents API's registry: who calls (a token's verdict), registration, heartbeats,
agents gone silent. The documents and the queries the console and the CLI share too
(tokens, listings) are in `sendscript/agent_store.py`.

A token's verdict (known, its scope) is trusted VERDICT_S in each agents process: a
removed token stops working everywhere within it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase

from agents.rules import AgentView, Scope
from sendscript.agent_store import (
    ACTIVE,
    AGENTS,
    LOST,
    TOKENS,
    agent_state,
    hash_secret,
    scope_of,
)
from sendscript.models import utcnow
from sendscript.store import GROUPS

AGENT_INDEXES = [IndexModel([("last_seen", ASCENDING)])]
CACHE_S = 30.0  # how long an agent's labels and devices are trusted
VERDICT_S = 1.0  # how long a token's verdict is trusted (a removed token: this long)


class Refused(Exception):
    """A call the API refuses: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls: the hash of a known token, and what that token may serve."""

    token: str
    scope: Scope = field(default_factory=Scope)


class Registry:
    def __init__(self, db: AsyncDatabase, ttl_s: float) -> None:
        self.col = db[AGENTS]
        self.tokens = db[TOKENS]
        self.groups = db[GROUPS]
        self.ttl_s = ttl_s
        self._verdicts: dict[str, tuple[Caller | None, float]] = {}
        # id -> (view, token hash, when read): labels and devices a registration made
        # through another process are seen within CACHE_S
        self._agents: dict[str, tuple[AgentView, str, float]] = {}

    async def ensure_indexes(self) -> None:
        await self.col.create_indexes(AGENT_INDEXES)

    async def authenticate(self, secret: str | None) -> Caller:
        """The known token's caller, or Refused(401)."""
        if not secret:
            raise Refused(401, "missing bearer token (Authorization: Bearer TOKEN)")
        digest = hash_secret(secret)
        now = time.monotonic()
        cached = self._verdicts.get(digest)
        if cached is None or now - cached[1] > VERDICT_S:
            caller = await self._read_token(digest)
            if len(self._verdicts) > 10_000:
                self._verdicts.clear()  # a flood of made-up tokens must not grow it forever
            cached = self._verdicts[digest] = (caller, now)
        if cached[0] is None:
            raise Refused(401, "unknown agent token")
        return cached[0]

    async def _read_token(self, digest: str) -> Caller | None:
        doc = await self.tokens.find_one({"_id": digest}, {"scope": 1})
        if doc is None:
            return None
        prefixes, groups = scope_of(doc)
        members: set[str] = set()
        if groups:
            async for group in self.groups.find({"_id": {"$in": groups}}, {"devices": 1}):
                members.update(group.get("devices", []))
        return Caller(digest, Scope(tuple(prefixes), tuple(groups), frozenset(members)))

    async def register(self, caller: Caller, agent_id: str, name: str, labels: list[str],
                       devices: list[str], version: str) -> AgentView:
        now = utcnow()
        token = caller.token
        if outside := caller.scope.outside(devices):
            raise Refused(403, f"device(s) {outside} are outside this token's scope "
                               f"({caller.scope.describe()})")
        current = await self.col.find_one({"_id": agent_id}, {"token": 1})
        if current is not None and current.get("token") not in ("", token):
            raise Refused(403, f"agent {agent_id!r} is registered with another token")
        if devices:
            cutoff = now - timedelta(seconds=self.ttl_s)
            taken = await self.col.find_one(
                {"_id": {"$ne": agent_id}, "devices": {"$in": devices},
                 "last_seen": {"$gt": cutoff}, "state": ACTIVE}, {"devices": 1})
            if taken is not None:
                both = sorted(set(devices) & set(taken.get("devices", [])))
                raise Refused(409, f"device(s) {both} are served by live agent {taken['_id']!r}")
        fields = {"name": name, "labels": sorted(set(labels)), "devices": sorted(set(devices)),
                  "version": version, "token": token, "last_seen": now, "state": ACTIVE,
                  "stop": False}
        await self.col.update_one({"_id": agent_id},
                                  {"$set": fields, "$setOnInsert": {"registered_at": now}},
                                  upsert=True)
        view = AgentView(agent_id, frozenset(labels), frozenset(devices))
        self._agents[agent_id] = (view, token, time.monotonic())
        return caller.scope.narrow(view)

    async def agent(self, caller: Caller, agent_id: str) -> AgentView:
        """The registered agent this token speaks for, within the token's scope, or
        Refused (404 / 403)."""
        token = caller.token
        cached = self._agents.get(agent_id)
        if cached is None or time.monotonic() - cached[2] > CACHE_S:
            doc = await self.col.find_one({"_id": agent_id})
            if doc is None:
                raise Refused(404, f"agent {agent_id!r} is not registered: register first")
            cached = (AgentView(agent_id, frozenset(doc.get("labels", [])),
                                frozenset(doc.get("devices", []))), doc.get("token", ""),
                      time.monotonic())
            if len(self._agents) > 100_000:
                self._agents.clear()
            self._agents[agent_id] = cached
        if cached[1] != token:
            raise Refused(403, f"this token does not speak for agent {agent_id!r}")
        return caller.scope.narrow(cached[0])

    async def heartbeat(self, agent_id: str) -> dict[str, Any]:
        """Renew the agent; what it was asked (stop)."""
        # One write, one read: find_one_and_update is a collection scan on SecantusDB.
        await self.col.update_one({"_id": agent_id},
                                  {"$set": {"last_seen": utcnow(), "state": ACTIVE}})
        doc = await self.col.find_one({"_id": agent_id}, {"stop": 1})
        return doc or {}

    async def mark_lost(self, now: datetime) -> list[str]:
        """Agents silent past the TTL that were active: marked lost; their ids."""
        cutoff = now - timedelta(seconds=self.ttl_s)
        ids = [d["_id"] async for d in self.col.find(
            {"state": ACTIVE, "last_seen": {"$lte": cutoff}}, {"_id": 1})]
        if ids:
            await self.col.update_many(
                {"_id": {"$in": ids}, "state": ACTIVE, "last_seen": {"$lte": cutoff}},
                {"$set": {"state": LOST, "lost_at": now}})
        return ids

    async def listing(self) -> list[dict[str, Any]]:
        now = utcnow()
        out = []
        async for doc in self.col.find({}, {"token": 0}).sort("_id", ASCENDING):
            doc["state"] = agent_state(doc, now, self.ttl_s)
            out.append(doc)
        return out
