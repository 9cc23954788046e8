"""Agents and their API tokens in Mongo: `agents` and `agent_tokens`.

`agent_tokens`: `_id` the SHA-256 of a token (the token itself is shown once, when it
is made, and never stored), `name`, `created_at`, `scope` (`prefixes`, `groups`: the
devices its agents may serve; both empty: all). `agents`: `_id` the agent id,
`name`, `labels`, `devices`, `version`, `token` (the hash it registered with: only
that token may speak for it; empty once that token is removed), `registered_at`,
`last_seen`, `state` (`active`, or `lost` once silent for SENDSCRIPT_AGENT_TTL_S),
`stop` (an operator asked it to stop).

A token's verdict (known, its scope) is trusted VERDICT_S in each agents process: a
removed token stops working everywhere within it.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from agents.rules import AgentView, Scope, hash_secret
from sendscript.groups import check_name
from sendscript.models import utcnow
from sendscript.store import GROUPS

AGENTS = "agents"
TOKENS = "agent_tokens"
ACTIVE = "active"
LOST = "lost"
AGENT_INDEXES = [IndexModel([("last_seen", ASCENDING)])]
CACHE_S = 30.0  # how long an agent's labels and devices are trusted
VERDICT_S = 1.0  # how long a token's verdict is trusted (a removed token: this long)
TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
PREFIX = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


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


def token_doc(name: str, prefixes: Iterable[str] = (), groups: Iterable[str] = ()
              ) -> tuple[str, dict[str, Any]]:
    """A new token and the document that stores it (hashed); ValueError on a bad name,
    prefix or group."""
    if not TOKEN_NAME.match(name):
        raise ValueError(f"invalid token name {name!r}: letters, digits, _ . @ - (1-100)")
    prefixes = sorted({p.strip() for p in prefixes if p.strip()})
    for prefix in prefixes:
        if not PREFIX.match(prefix):
            raise ValueError(f"invalid device prefix {prefix!r}")
    groups = sorted({check_name(g.strip()) for g in groups if g.strip()})
    secret = secrets.token_urlsafe(24)
    return secret, {"_id": hash_secret(secret), "name": name, "created_at": utcnow(),
                    "scope": {"prefixes": prefixes, "groups": groups}}


def add_token_sync(db: Database, name: str, prefixes: Iterable[str] = (),
                   groups: Iterable[str] = ()) -> str:
    """A new API token for agents (CLI, console, tests): stored hashed, returned once."""
    secret, doc = token_doc(name, prefixes, groups)
    db[TOKENS].insert_one(doc)
    return secret


async def add_token(db: AsyncDatabase, name: str, prefixes: Iterable[str] = (),
                    groups: Iterable[str] = ()) -> str:
    secret, doc = token_doc(name, prefixes, groups)
    await db[TOKENS].insert_one(doc)
    return secret


def scope_of(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    scope = doc.get("scope") or {}
    return list(scope.get("prefixes") or []), list(scope.get("groups") or [])


def list_tokens_sync(db: Database) -> list[dict[str, Any]]:
    """The tokens by name: a short id (the hash's head, to tell same-named ones apart),
    scope, dates; never a hash whole nor the token. `last_used`: when an agent bound to
    it was last seen (None: none is, e.g. never used or its agents took another)."""
    docs = list(db[TOKENS].find({}).sort([("name", ASCENDING), ("created_at", ASCENDING)]))
    seen = last_seen_by_token(db, [d["_id"] for d in docs])
    out = []
    for doc in docs:
        prefixes, groups = scope_of(doc)
        out.append({"id": str(doc["_id"])[:12], "name": doc.get("name", ""),
                    "prefixes": prefixes, "groups": groups,
                    "created_at": doc.get("created_at"), "last_used": seen.get(doc["_id"])})
    return out


def last_seen_by_token(db: Database, hashes: list[str]) -> dict[str, datetime]:
    """Token hash -> the latest `last_seen` of the agents bound to it. Tokens are not
    written on use (every call would be a write); an agent's heartbeat already is."""
    latest: dict[str, datetime] = {}
    if not hashes:
        return latest
    for agent in db[AGENTS].find({"token": {"$in": hashes}}, {"token": 1, "last_seen": 1}):
        at, token = agent.get("last_seen"), agent.get("token")
        if at is not None and (token not in latest or at > latest[token]):
            latest[token] = at
    return latest


def remove_token_sync(db: Database, name_or_id: str) -> int:
    """Remove the tokens of that name (or that short id): how many. Their agents are
    unbound (another token may register those ids) and asked to stop; every agents
    process refuses the tokens within VERDICT_S."""
    if not name_or_id:
        return 0
    docs = list(db[TOKENS].find({"name": name_or_id}, {"_id": 1}))
    if not docs and re.fullmatch(r"[0-9a-f]{8,64}", name_or_id):
        docs = list(db[TOKENS].find({"_id": {"$regex": f"^{name_or_id}"}}, {"_id": 1}))
    hashes = [d["_id"] for d in docs]
    if not hashes:
        return 0
    removed = db[TOKENS].delete_many({"_id": {"$in": hashes}}).deleted_count
    db[AGENTS].update_many({"token": {"$in": hashes}}, {"$set": {"token": "", "stop": True}})
    return removed


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
