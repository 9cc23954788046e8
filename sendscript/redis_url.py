"""What `SENDSCRIPT_REDIS_URL` names: one server, a Sentinel-watched master or a cluster.

- `redis://[user:password@]host:port/db` (`rediss://` for TLS, `unix://` a socket):
  one server, read by redis-py's own URL parser.
- `redis+sentinel://[user:password@]host:port,host:port,.../service_name[/db]`:
  the Sentinels (port 26379 if omitted) that know the master of `service_name`;
  every connection asks them where the master is now, so a failover is followed
  without a restart. `?sentinel_password=` when the Sentinels want one of their own.
- `redis+cluster://[user:password@]host:port,host:port,...`: any nodes of a Redis
  Cluster (port 6379 if omitted); the client learns the others. Every key goes under
  the key prefix in a hash tag (`{sendscript}:...`): one slot, so every Lua script
  and MULTI is legal. That is cluster-mode compatibility and failover, not sharding.

`rediss+sentinel://` and `rediss+cluster://` speak TLS to the Redis servers.
Parsed here without connecting, so a URL the roles cannot use stops them at start.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

Kind = Literal["server", "sentinel", "cluster"]

_SERVER = ("redis", "rediss", "unix")
_SENTINEL = ("redis+sentinel", "rediss+sentinel")
_CLUSTER = ("redis+cluster", "rediss+cluster")
SCHEMES = _SERVER + _SENTINEL + _CLUSTER
SENTINEL_PORT = 26379
REDIS_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    sentinel_password: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def cluster(self) -> bool:
        return self.kind == "cluster"


def _nodes(netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    hosts = netloc.rpartition("@")[2]
    nodes = []
    for part in filter(None, (p.strip() for p in hosts.split(","))):
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port_text = rest.lstrip(":")
        else:
            host, _, port_text = part.rpartition(":") if ":" in part else (part, "", "")
        if not host:
            raise ValueError(f"no host in {part!r}")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"bad port in {part!r}") from None
        if not 0 < port < 65536:
            raise ValueError(f"bad port in {part!r}")
        nodes.append((host, port))
    if not nodes:
        raise ValueError("no host:port")
    return tuple(nodes)


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    if not colon:  # redis://secret@host: the password alone, as redis-py reads it
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _db(text: str) -> int:
    try:
        db = int(text) if text else 0
    except ValueError:
        raise ValueError(f"bad database number {text!r}") from None
    if db < 0:
        raise ValueError(f"bad database number {text!r}")
    return db


@lru_cache(maxsize=64)
def parse(url: str) -> RedisTarget:
    """The topology `url` names; ValueError saying what is wrong with it."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(s + '://' for s in SCHEMES)}"
                         f" (got {url.partition('://')[0] or url!r})")
    if scheme in _SERVER:
        from redis.connection import parse_url

        try:
            parse_url(url)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        return RedisTarget("server", url)
    parts = urlsplit(url)
    username, password = _credentials(parts.netloc)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    ssl = scheme.startswith("rediss")
    path = [p for p in parts.path.split("/") if p]
    if scheme in _SENTINEL:
        if not path:
            raise ValueError("name the master's service: redis+sentinel://h:p,h:p/service")
        if len(path) > 2:
            raise ValueError(f"expected /service_name[/db], got {parts.path!r}")
        return RedisTarget(
            "sentinel", url, _nodes(parts.netloc, SENTINEL_PORT), unquote(path[0]),
            _db(path[1] if len(path) > 1 else ""), username, password, ssl,
            options.pop("sentinel_password", None), options)
    if path and path != ["0"]:
        raise ValueError("a cluster has database 0 only: redis+cluster://h:p,h:p")
    return RedisTarget("cluster", url, _nodes(parts.netloc, REDIS_PORT), None, 0,
                       username, password, ssl, None, options)


def hash_tagged(prefix: str) -> str:
    """`prefix` as one hash tag, unless it already holds one (`{sendscript}`,
    `app:{sendscript}`): every key under it then maps to one cluster slot."""
    start = prefix.find("{")
    if start >= 0 and prefix.find("}", start + 1) > start + 1:
        return prefix
    return "{" + prefix + "}"
