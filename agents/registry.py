"""Agents and their API tokens in Mongo: `agents` and `agent_tokens`.

`agent_tokens`: `_id` the SHA-256 of a token (the token itself is shown once, when it
is made, and never stored), `name`, `created_at`. `agents`: `_id` the agent id,
`name`, `labels`, `devices`, `version`, `token` (the hash it registered with: only
that token may speak for it), `registered_at`, `last_seen`, `state` (`active`, or
`lost` once silent for SENDSCRIPT_AGENT_TTL_S), `stop` (an operator asked it to stop).
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from agents.rules import AgentView, hash_secret
from sendscript.models import utcnow

AGENTS = "agents"
TOKENS = "agent_tokens"
ACTIVE = "active"
LOST = "lost"
AGENT_INDEXES = [IndexModel([("last_seen", ASCENDING)])]
CACHE_S = 30.0  # how long a token's verdict is trusted (a revoked token: this long)


class Refused(Exception):
    """A call the API refuses: the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def add_token_sync(db: Database, name: str) -> str:
    """A new API token for agents (CLI, tests): stored hashed, returned once."""
    secret = secrets.token_urlsafe(24)
    db[TOKENS].insert_one({"_id": hash_secret(secret), "name": name, "created_at": utcnow()})
    return secret


async def add_token(db: AsyncDatabase, name: str) -> str:
    secret = secrets.token_urlsafe(24)
    await db[TOKENS].insert_one({"_id": hash_secret(secret), "name": name,
                                 "created_at": utcnow()})
    return secret


def agent_state(doc: dict[str, Any], now: datetime, ttl_s: float) -> str:
    """`lost` once silent for ttl_s, whatever the stored state says."""
    seen = doc.get("last_seen")
    if seen is None or seen <= now - timedelta(seconds=ttl_s):
        return LOST
    return str(doc.get("state", ACTIVE))


class Registry:
    def __init__(self, db: AsyncDatabase, ttl_s: float) -> None:
        self.col = db[AGENTS]
        self.tokens = db[TOKENS]
        self.ttl_s = ttl_s
        self._verdicts: dict[str, tuple[bool, float]] = {}
        # id -> (view, token hash, when read): labels and devices a registration made
        # through another process are seen within CACHE_S
        self._agents: dict[str, tuple[AgentView, str, float]] = {}

    async def ensure_indexes(self) -> None:
        await self.col.create_indexes(AGENT_INDEXES)

    async def authenticate(self, secret: str | None) -> str:
        """The token's hash, or Refused(401)."""
        if not secret:
            raise Refused(401, "missing bearer token (Authorization: Bearer TOKEN)")
        digest = hash_secret(secret)
        now = time.monotonic()
        cached = self._verdicts.get(digest)
        if cached is None or now - cached[1] > CACHE_S:
            known = await self.tokens.find_one({"_id": digest}, {"_id": 1}) is not None
            if len(self._verdicts) > 10_000:
                self._verdicts.clear()  # a flood of made-up tokens must not grow it forever
            cached = self._verdicts[digest] = (known, now)
        if not cached[0]:
            raise Refused(401, "unknown agent token")
        return digest

    async def register(self, token: str, agent_id: str, name: str, labels: list[str],
                       devices: list[str], version: str) -> AgentView:
        now = utcnow()
        current = await self.col.find_one({"_id": agent_id}, {"token": 1})
        if current is not None and current.get("token") != token:
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
        return view

    async def agent(self, token: str, agent_id: str) -> AgentView:
        """The registered agent this token speaks for, or Refused (404 / 403)."""
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
        return cached[0]

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
