"""Names of every Redis key and channel sendscript uses: the Redis half of the contract."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def ready(self) -> str:
        """Producers LPUSH task specs or `{"task_id": ...}` here."""
        return f"{self.prefix}:queue:ready"

    @property
    def quarantine(self) -> str:
        """Malformed queue items, each with the reason it was refused."""
        return f"{self.prefix}:queue:quarantine"

    def staging(self, master_id: str) -> str:
        """One item a master has blocked for (BLMOVE) and not yet tagged."""
        return f"{self.prefix}:queue:staging:{master_id}"

    def processing(self, master_id: str) -> str:
        """Tagged items a master has taken but not yet stored in Mongo."""
        return f"{self.prefix}:queue:processing:{master_id}"

    def queue_cap(self, queue: str) -> str:
        """Sorted set task id -> expiry (Redis ms): the running slots of a capped queue,
        held by every master together (master/queue_caps.py)."""
        return f"{self.prefix}:queue:cap:{queue}"

    @property
    def fanout_cursors(self) -> str:
        """Hash queue-item tag -> the last device (in sorted order) of a fan-out item
        whose tasks are stored: where storing it goes on after a crash."""
        return f"{self.prefix}:queue:fanout-cursor"

    @property
    def intake_seq(self) -> str:
        return f"{self.prefix}:queue:seq"

    @property
    def lock_fence(self) -> str:
        return f"{self.prefix}:lock:fence"

    def device_lock(self, device_id: str) -> str:
        return f"{self.prefix}:lock:device:{device_id}"

    @property
    def lock_owners(self) -> str:
        """Hash device_id -> "<fence> <task id> <worker>": what the device's lock was
        taken for (sendscript/locks.py)."""
        return f"{self.prefix}:lock:owners"

    @property
    def device_lock_pattern(self) -> str:
        return f"{self.prefix}:lock:device:*"

    @property
    def device_free_channel(self) -> str:
        """Pub/sub channel: one JSON `{"device_id", "fence"}` per freed device."""
        return f"{self.prefix}:events:device-free"

    @property
    def masters(self) -> str:
        """Hash master_id -> JSON heartbeat (workers, queue sizes, time)."""
        return f"{self.prefix}:masters"

    def master_alive(self, master_id: str) -> str:
        """Expiring key: present while the master's heartbeat is fresh."""
        return f"{self.prefix}:master:{master_id}:alive"

    def master_claim(self, master_id: str) -> str:
        """Expiring key: the token of the one live process running under master_id
        (master/identity.py); a second process under that id refuses to start."""
        return f"{self.prefix}:master:{master_id}:claim"

    @property
    def consumers(self) -> str:
        """Hash consumer name -> JSON heartbeat (totals, time)."""
        return f"{self.prefix}:consumers"

    def consumer_alive(self, name: str) -> str:
        return f"{self.prefix}:consumer:{name}:alive"

    @property
    def stats(self) -> str:
        """Hash of service-wide counters (quarantined, dead_lettered, ...)."""
        return f"{self.prefix}:stats"

    def rate_limit(self, name: str) -> str:
        """Hash of a rate limit: `d` ms, `used` (the tokens all masters took in its
        sliding window), an adaptive limit's `cur`, `hold`, `why` (`sendscript.limits`)."""
        return f"{self.prefix}:limit:{name}"

    def rate_limit_grants(self, name: str) -> str:
        """Sorted set of a rate limit's grants that still count (`sendscript.limits`)."""
        return f"{self.prefix}:limit:{name}:grants"

    @property
    def roundtrips(self) -> str:
        """Hash of round-trip counters per role and server (benchmarks read it)."""
        return f"{self.prefix}:stats:roundtrips"

    def alert(self, kind: str, key: str) -> str:
        """An incident's cluster-wide record (master/alerts.py): the announcing
        master's id while it is on, `resolved:<id>` once its end was sent; expiring."""
        return f"{self.prefix}:alert:{kind}:{key}"

    @property
    def pauses(self) -> str:
        """Hash scope -> JSON {reason, by, at}: the pause flags (sendscript/pauses.py)."""
        return f"{self.prefix}:pauses"

    @property
    def pauses_channel(self) -> str:
        """Pub/sub channel: `{"scope", "active"}` each time a pause is set or lifted."""
        return f"{self.prefix}:events:pauses"

    @property
    def quota_probe(self) -> str:
        """Expiring key: the master that set it sends the next quota probe."""
        return f"{self.prefix}:pauses:quota-probe"

    @property
    def breaker(self) -> str:
        """Hash of the circuit breaker on central-control shared by all masters:
        `state` (`sendscript.breaker.BreakerState` as JSON) and `version`, written by
        compare-and-set (master/breaker.py)."""
        return f"{self.prefix}:breaker"

    @property
    def drop_rate(self) -> str:
        """Hash of the drop-rate window shared by all masters (master/droprate.py):
        `f:<second>` tasks finished, `d:<second>` dropped, `l:<second>` results lost;
        `rt_seen`, `rf_seen` the stats' result_timeouts and result_timeouts_final
        already counted."""
        return f"{self.prefix}:droprate"

    @property
    def device_health(self) -> str:
        """Hash device -> JSON {streak, level, until_ms, since_ms, why, last}: its
        failures in a row and benches (sendscript/device_health.py)."""
        return f"{self.prefix}:devices:health"

    @property
    def devices_benched(self) -> str:
        """Sorted set device -> end of its bench (epoch ms): benched devices' tasks wait."""
        return f"{self.prefix}:devices:benched"

    @property
    def devices_known(self) -> str:
        """Sorted set, every score 0: every device that has run a task or is in a group,
        read in id order by ZRANGEBYLEX (the fleet view's prefix search and paging)."""
        return f"{self.prefix}:devices:known"

    @property
    def devices_known_built(self) -> str:
        """Set once `devices_known` holds every device of Mongo's `devices` and groups:
        a Redis that lost its data has neither, and the console builds them anew."""
        return f"{self.prefix}:devices:known:built"

    @property
    def devices_channel(self) -> str:
        """Pub/sub channel: `{"benched": [...]}` or `{"resumed": device}` on each change."""
        return f"{self.prefix}:events:devices"
