"""Agents and their API tokens in Mongo, `agents` and `agent_tokens`: the documents and
the queries that the agents API, the console and the CLI share.

`agent_tokens`: `_id` the SHA-256 of a token (the token itself is shown once, when it
is made, and never stored), `name`, `created_at`, `scope` (`prefixes`, `groups`: the
devices its agents may serve; both empty: all). `agents`: `_id` the agent id,
`name`, `labels`, `devices`, `version`, `token` (the hash it registered with: only
that token may speak for it; empty once that token is removed), `registered_at`,
`last_seen`, `state` (`active`, or `lost` once silent for SENDSCRIPT_AGENT_TTL_S),
`stop` (an operator asked it to stop).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.database import Database

from sendscript.groups import check_name
from sendscript.models import PULL, utcnow
from sendscript.store import TASKS

AGENTS = "agents"
TOKENS = "agent_tokens"
ACTIVE = "active"
LOST = "lost"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
PREFIX = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


def hash_secret(secret: str) -> str:
    """Agent API tokens are stored as this hash only."""
    return hashlib.sha256(secret.encode()).hexdigest()


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
    secret = new_secret()
    return secret, {"_id": hash_secret(secret), "name": name, "created_at": utcnow(),
                    "scope": {"prefixes": prefixes, "groups": groups}}


def new_secret() -> str:
    """An agent's token: URL-safe, and never starting with "-", which a command line
    (`--token -x...`) would take for an option."""
    while (secret := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return secret


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
    process refuses the tokens within its verdict time (a second)."""
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


def agents_sync(db: Database, ttl_s: float, limit: int = 0) -> list[dict[str, Any]]:
    """Registered agents by id, each with its `state` as of now; never the token they
    registered with. `limit` 0: all."""
    now = utcnow()
    out = []
    for doc in db[AGENTS].find({}, {"token": 0}).sort("_id", ASCENDING).limit(limit):
        doc["state"] = agent_state(doc, now, ttl_s)
        out.append(doc)
    return out


def leases_held_sync(db: Database, limit: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Running pull tasks per leasing agent (the mode/status index bounds the read)."""
    held: dict[str, list[dict[str, Any]]] = {}
    if db[AGENTS].find_one({}, {"_id": 1}) is None:
        # No agent ever registered: no lease, and maybe no pull index to read it by
        # (the agents role makes them), so no scan of every task to find none.
        return held
    for doc in db[TASKS].find(
            {"mode": PULL, "status": "running"},
            {"lease.agent": 1, "lease.deadline": 1, "lease.cap": 1, "device_id": 1}
    ).limit(limit):
        lease = doc.get("lease") or {}
        held.setdefault(str(lease.get("agent", "")), []).append(
            {"task_id": doc["_id"], "device_id": doc.get("device_id"),
             "deadline": lease.get("deadline"), "cap": lease.get("cap")})
    return held


def ask_stop_sync(db: Database, agent_id: str) -> bool | None:
    """Ask an agent to stop: its next heartbeat answers stop (it finishes or gives back
    what it holds); registering again clears the request. None: no such agent; else
    whether the request is new (False: it had been asked already)."""
    found = db[AGENTS].update_one({"_id": agent_id}, {"$set": {"stop": True}})
    if not found.matched_count:
        return None
    return found.modified_count > 0
