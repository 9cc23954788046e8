"""What an operator may do from the console, each written to the `audit` collection.

One task: retry, cancel. Many: the same on every task a filter selects, in two steps
(preview counts and signs a confirmation bound to the action, the filter, the count
and the person; the action requires it, spends it once, and touches at most that
count; a replay is refused and audited). Quarantined queue items go back onto the ready list.
Pauses are the service's flags (sendscript/pauses.py). An agent is asked to stop
as `sendscript agent stop` asks it; agents' API tokens are made and removed as
`sendscript agent token add|remove` does. Every change goes through the
SDK or the same compare-and-set the service uses, so the masters see it as they see
the CLI's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from console import auth
from console.data import AUDIT, Stores, entry_id, task_query
from console.filters import TaskFilter
from sendscript import pauses as flags
from sendscript.agent_store import add_token_sync, ask_stop_sync, remove_token_sync
from sendscript.client import SendScriptClient
from sendscript.models import utcnow
from sendscript.status import CANCELLABLE, RETRYABLE_BY_HAND, TaskStatus, task_cas
from sendscript.store import TASKS, chunks

BulkAction = Literal["retry", "cancel"]
ELIGIBLE: dict[str, frozenset[TaskStatus]] = {"retry": RETRYABLE_BY_HAND,
                                              "cancel": CANCELLABLE}

# KEYS[1] the quarantine list, KEYS[2] the ready list; ARGV[1] the quarantine entry as
# stored, ARGV[2] the item it holds. Removes one copy of the entry and, only if one was
# there, pushes the item back: two operators requeueing it at once requeue it once.
REQUEUE = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 1 then redis.call('LPUSH', KEYS[2], ARGV[2]) end
return removed
"""


class Refused(ValueError):
    """The action cannot run as asked (the reason is for the user); nothing changed."""

    def __init__(self, reason: str, status: int = 409) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class Actions:
    stores: Stores
    client: SendScriptClient
    secret: bytes

    # -- audit -------------------------------------------------------------------------
    def audit(self, who: auth.Principal, action: str, *, target: str | None = None,
              flt: TaskFilter | None = None, count: int = 0, result: Any = None) -> None:
        self.stores.db[AUDIT].insert_one({
            "at": utcnow(), "who": who.name, "role": who.role, "action": action,
            "target": target, "filter": json.loads(flt.canonical()) if flt else None,
            "count": count, "result": result})

    # -- one task ----------------------------------------------------------------------
    def retry(self, who: auth.Principal, task_id: str) -> bool:
        if self.stores.db[TASKS].find_one({"_id": task_id}, {"_id": 1}) is None:
            raise Refused(f"no task {task_id}", 404)
        try:
            done = self.client.retry(task_id)
        except ValueError as exc:
            raise Refused(str(exc)) from None
        if not done:
            raise Refused(f"task {task_id} is not failed, expired or cancelled")
        self.audit(who, "retry", target=task_id, count=1)
        return True

    def cancel(self, who: auth.Principal, task_id: str) -> str:
        try:
            was = self.client.cancel(task_id, f"cancelled by {who.name} (console)")
        except KeyError:
            raise Refused(f"no task {task_id}", 404) from None
        if was is None:
            raise Refused(f"task {task_id} had already finished")
        self.audit(who, "cancel", target=task_id, count=1, result={"was": was})
        return was

    # -- many tasks --------------------------------------------------------------------
    def _query(self, action: str, flt: TaskFilter) -> dict[str, Any]:
        if flt.is_empty():
            raise Refused("a bulk action needs a filter (at least one field)", 422)
        query = task_query(self.stores.db, flt)
        eligible = sorted(str(s) for s in ELIGIBLE[action])
        if flt.status is not None and str(flt.status) not in eligible:
            return {"_id": {"$in": []}}
        return {**query, "status": {"$in": eligible}} if flt.status is None else query

    def preview(self, who: auth.Principal, action: BulkAction, flt: TaskFilter,
                cap: int, ttl_s: float) -> dict[str, Any]:
        count = self.stores.db[TASKS].count_documents(self._query(action, flt), limit=cap + 1)
        if count > cap:
            raise Refused(f"more than {cap} tasks match: narrow the filter "
                          "(SENDSCRIPT_CONSOLE_BULK_MAX)", 422)
        nonce = auth.new_nonce()
        auth.keep_confirmation(self.stores.db, nonce, who.name, ttl_s)
        token = auth.make_confirmation(self.secret, action, flt.digest(), count, who.name,
                                       ttl_s, nonce)
        return {"action": action, "count": count, "confirm": token, "expires_in_s": ttl_s}

    def _confirmed(self, who: auth.Principal, action: BulkAction, flt: TaskFilter,
                   confirm: str) -> int:
        """The count the confirmation allows, spent now; Refused otherwise (a replay
        audited: someone holds a real confirmation and tried it twice)."""
        try:
            confirmation = auth.check_confirmation(self.secret, confirm, action, flt.digest(),
                                                   who.name)
        except ValueError as exc:
            raise Refused(str(exc), 403) from None
        if not auth.spend_confirmation(self.stores.db, confirmation.nonce, who.name):
            reason = "confirmation already used: preview again"
            self.audit(who, f"bulk {action} refused", flt=flt, result={"reason": reason})
            raise Refused(reason, 403)
        return confirmation.count

    def bulk(self, who: auth.Principal, action: BulkAction, flt: TaskFilter, confirm: str,
             cap: int) -> dict[str, Any]:
        confirmed = min(self._confirmed(who, action, flt, confirm), cap)
        # One more than confirmed tells whether the filter matches more than was shown
        # (pymongo reads limit 0 as "no limit": nothing confirmed reads nothing).
        found = [d["_id"] for d in self.stores.db[TASKS].find(
            self._query(action, flt), {"_id": 1}).limit(confirmed + 1)] if confirmed else []
        ids, beyond = found[:confirmed], len(found) > confirmed
        if action == "cancel":
            done, skipped = self._cancel_many(who, ids), 0
        else:
            done = skipped = 0
            for task_id in ids:
                try:
                    done += self.client.retry(task_id)
                except ValueError:
                    skipped += 1  # its dedupe key belongs to an unfinished task
        result = {"action": action, "confirmed": confirmed, "matched": len(ids), "done": done,
                  "skipped": skipped, "beyond_confirmed": beyond}
        if beyond:
            result["note"] = (f"more than the {confirmed} confirmed tasks match now; only "
                              f"{confirmed} were touched: preview again for the rest")
        self.audit(who, f"bulk {action}", flt=flt, count=done, result=result)
        return result

    def _cancel_many(self, who: auth.Principal, ids: list[str]) -> int:
        done = 0
        for part in chunks(ids):
            flt, update = task_cas(part, CANCELLABLE, TaskStatus.CANCELLED, utcnow(),
                                   set_={"last_error": f"cancelled by {who.name} (console)"})
            done += self.stores.db[TASKS].update_many(flt, update).modified_count
        return done

    # -- quarantine --------------------------------------------------------------------
    def requeue(self, who: auth.Principal, item_id: str, scan: int = 10_000) -> dict[str, Any]:
        keys, r = self.stores.keys, self.stores.redis
        for raw in r.lrange(keys.quarantine, 0, scan - 1):
            if entry_id(raw) != item_id:
                continue
            try:
                doc = json.loads(raw)
                item = doc["item"]
                if not isinstance(item, str):
                    raise TypeError("item is not text")
            except (ValueError, KeyError, TypeError) as exc:
                raise Refused(f"quarantine entry unreadable: {exc}") from None
            if not r.eval(REQUEUE, 2, keys.quarantine, keys.ready, raw, item):
                break  # someone else requeued or removed it meanwhile
            self.audit(who, "requeue", target=item_id, count=1,
                       result={"reason": doc.get("reason", "")})
            return {"requeued": item_id}
        raise Refused(f"no quarantined item {item_id}", 404)

    # -- pauses ------------------------------------------------------------------------
    def pause(self, who: auth.Principal, scope: str, reason: str) -> dict[str, Any]:
        pause = flags.pause_sync(self.stores.redis, self.stores.keys, scope, reason,
                                 f"console:{who.name}")
        self.audit(who, "pause", target=scope, count=1, result={"reason": reason})
        return pause.to_dict()

    def resume(self, who: auth.Principal, scope: str) -> dict[str, Any] | None:
        lifted = flags.resume_sync(self.stores.redis, self.stores.keys, scope)
        self.audit(who, "resume", target=scope, count=int(lifted is not None))
        return lifted.to_dict() if lifted else None

    # -- agents ------------------------------------------------------------------------
    def stop_agent(self, who: auth.Principal, agent_id: str) -> dict[str, Any]:
        """Ask an agent to stop, as the CLI does: its next heartbeat answers stop (it
        finishes or gives back what it holds)."""
        asked = ask_stop_sync(self.stores.db, agent_id)
        if asked is None:
            raise Refused(f"no agent {agent_id}", 404)
        result = {"already": not asked}
        self.audit(who, "agent stop", target=agent_id, count=1, result=result)
        return {"stopped": agent_id, **result}

    def add_agent_token(self, who: auth.Principal, name: str, prefixes: list[str],
                        groups: list[str]) -> dict[str, Any]:
        """A new agents' API token, shown in this answer only (the audit never holds it)."""
        try:
            token = add_token_sync(self.stores.db, name, prefixes, groups)
        except ValueError as exc:
            raise Refused(str(exc), 422) from None
        scope = {"prefixes": sorted(set(prefixes)), "groups": sorted(set(groups))}
        self.audit(who, "agent token add", target=name, count=1, result=scope)
        return {"name": name, "token": token, **scope}

    def remove_agent_token(self, who: auth.Principal, name: str) -> dict[str, Any]:
        """Remove the agents' tokens of that name (or short id): refused everywhere
        within a second, their agents unbound and asked to stop."""
        removed = remove_token_sync(self.stores.db, name)
        if not removed:
            raise Refused(f"no agent token {name}", 404)
        self.audit(who, "agent token remove", target=name, count=removed)
        return {"removed": removed, "name": name}
