"""Alerts in the master: `Incident` events become alerts, once per incident in the cluster.

Naming: one noun per concern; `sendscript/alerts.py` holds its state and rule, shared by
every role, and `master/alerts.py` (this module) the master part that drives it.

Locally, an incident (its kind and key) is announced when it starts and when it
ends; a repeat of one already on, or the end of one never seen, is ignored.
Across masters (several see the same open breaker), a Redis record per incident
decides who sends: the first master to start it claims it (`START`) and sends
"started"; the first to see it end marks it resolved (`RESOLVE`) and sends
"resolved"; the others send nothing. The record expires after
`alert_claim_ttl_s` unless a master that still sees the incident renews it
(`RENEW`), so a record outlives the master that made it but not the incident.
The claims are made by the notifier's loop right before sending, never in a
bus handler.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio
from redis.exceptions import NoScriptError

from master.bus import Subscription
from master.events import Incident, IncidentForgotten
from sendscript.alerts import Alert, Notifier
from sendscript.backoff import every
from sendscript.models import utcnow
from sendscript.settings import Settings

# Claim the start of an incident. KEYS[1] = its record; ARGV[1] = this master's id,
# ARGV[2] = TTL ms. 1: ours to announce (no record, or the last one ended); 0: on
# already, announced by another master (or by us before a restart).
START = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 9) ~= 'resolved:' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Claim the end. KEYS[1] = its record; ARGV[1] = this master's id, ARGV[2] = TTL ms.
# 1: ours to announce (the record is on, or it lapsed: nobody else will say it);
# 0: another master announced the end already. The record becomes `resolved:<id>`
# so that the masters that see the end later stay silent.
# (`resolved:` is sendscript.alerts.RESOLVED: `sendscript status` reads the records.)
RESOLVE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 9) == 'resolved:' then return 0 end
redis.call('SET', KEYS[1], 'resolved:' .. ARGV[1], 'PX', ARGV[2])
return 1
"""

# Keep the record of an incident still on. KEYS[1] = its record; ARGV[1] = this
# master's id, ARGV[2] = TTL ms. A lapsed record (its announcer died, or Redis
# lost it) is taken over silently: it was announced already. An ended one is left.
RENEW = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if string.sub(v, 1, 9) == 'resolved:' then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


class Alerting:
    """Subscribes to `Incident`; hands what must be said to the notifier."""

    def __init__(self, settings: Settings, client: redis.asyncio.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.active: dict[tuple[str, str], Incident] = {}
        self.notifier = Notifier(settings, claim=self.claim)
        self._start = client.register_script(START)
        self._resolve = client.register_script(RESOLVE)
        self._renew = client.register_script(RENEW)
        self.ttl_ms = int(settings.alert_claim_ttl_s * 1000)

    def subscriptions(self) -> list[Subscription]:
        return [
            (Incident, self.on_incident),
            (IncidentForgotten, lambda e: self.forget(e.kind, e.key)),
        ]

    def on_incident(self, event: Incident) -> None:
        ident = (event.kind, event.key)
        if event.active == (ident in self.active):
            return  # a repeat of what is on, or the end of what we never saw start
        if event.active:
            self.active[ident] = event
        else:
            del self.active[ident]
        self.notifier.offer(Alert(
            incident=event.kind, key=event.key,
            state="started" if event.active else "resolved", detail=event.detail,
            master=self.settings.master_id, at=utcnow()))

    def forget(self, kind: str, key: str) -> None:
        """Stop following an incident without announcing its end (another master
        follows it now)."""
        self.active.pop((kind, key), None)

    async def claim(self, alert: Alert) -> bool:
        script = self._start if alert.state == "started" else self._resolve
        key = self.settings.keys.alert(alert.incident, alert.key)
        return bool(await script(keys=[key], args=[self.settings.master_id, self.ttl_ms]))

    async def renew(self) -> None:
        """Keep the records of the incidents still on from lapsing."""
        if not self.active:
            return
        keys = [self.settings.keys.alert(kind, key) for kind, key in list(self.active)]
        # EVALSHA in one pipeline, the script loaded on demand: a cluster's pipeline
        # does not load a Script as a one-server pipeline does (it answered NoScript).
        for _ in range(2):
            pipe = self.redis.pipeline(transaction=False)
            for key in keys:
                pipe.evalsha(self._renew.sha, 1, key, self.settings.master_id, self.ttl_ms)
            answers = await pipe.execute(raise_on_error=False)
            if any(isinstance(a, NoScriptError) for a in answers):
                await self.redis.script_load(RENEW)
                continue
            for answer in answers:
                if isinstance(answer, Exception):
                    raise answer
            return
        raise RuntimeError("alert renew script missing right after SCRIPT LOAD")

    async def run(self, stop: asyncio.Event) -> None:
        renewing = asyncio.create_task(every(
            stop, self.settings.alert_claim_ttl_s / 3, "alert records", self.renew,
            wait_first=True))
        try:
            await self.notifier.run(stop)
        finally:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)

    def report(self) -> dict[str, Any]:
        return {"active": sorted(f"{kind}:{key}" for kind, key in self.active),
                **self.notifier.report()}
