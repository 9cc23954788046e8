"""A role's heartbeat in Redis, written the same way by every role.

The role's status is a JSON object in a hash (`{prefix}:masters`,
`{prefix}:consumers`) under the role's name, where `status` and the console read
it; beside it an expiring key says the role is alive. The entry outlives the
role on purpose: a dead master's entry is how the leader finds what it held.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from sendscript.keys import Keys


def add_beat(pipe: Any, hash_key: str, member: str, alive_key: str,
             status: dict[str, Any], ttl_s: float) -> None:
    """Queue one heartbeat on a Redis pipeline: `status` (with its `updated_at`)
    under `member` of `hash_key`, and `alive_key` expiring after `ttl_s`."""
    pipe.hset(hash_key, member, json.dumps(status))
    pipe.set(alive_key, status["updated_at"], px=int(ttl_s * 1000))


def live_masters(client: redis.Redis, keys: Keys) -> list[str]:
    """The masters the masters hash names whose heartbeat is fresh, sorted."""
    ids = sorted(k.decode() if isinstance(k, bytes) else k for k in client.hkeys(keys.masters))
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for master_id in ids:
        pipe.exists(keys.master_alive(master_id))
    return [m for m, up in zip(ids, pipe.execute(), strict=True) if up]
