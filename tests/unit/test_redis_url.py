"""SENDSCRIPT_REDIS_URL: the topologies it names, the hash-tagged prefix on a cluster,
and a URL no client can use refused at start in one line (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sendscript import redis_url
from sendscript.redis_url import hash_tagged, parse
from sendscript.settings import Settings


def test_one_server_urls_are_left_to_redis_py() -> None:
    for url in ("redis://h:1/2", "rediss://:pw@h:1", "unix:///tmp/r.sock"):
        assert parse(url).kind == "server" and parse(url).url == url


def test_sentinel_url_names_the_sentinels_and_the_service() -> None:
    t = parse("redis+sentinel://u:p%40ss@a,b:5,[::1]:7/mymaster/3?sentinel_password=s")
    assert (t.kind, t.service, t.db) == ("sentinel", "mymaster", 3)
    assert t.nodes == (("a", redis_url.SENTINEL_PORT), ("b", 5), ("::1", 7))
    assert (t.username, t.password, t.sentinel_password, t.ssl) == ("u", "p@ss", "s", False)
    assert parse("rediss+sentinel://a/m").ssl


def test_cluster_url_names_its_seed_nodes() -> None:
    t = parse("redis+cluster://:pw@a:7000,b")
    assert t.cluster and t.nodes == (("a", 7000), ("b", redis_url.REDIS_PORT))
    assert t.password == "pw"


@pytest.mark.parametrize("url, why", [
    ("http://h", "scheme must be one of"),
    ("localhost:6379", "scheme must be one of"),
    ("redis+sentinel://a:1,b:2", "name the master's service"),
    ("redis+sentinel://a/m/x", "bad database number"),
    ("redis+cluster://a:x", "bad port"),
    ("redis+cluster://a:70000", "bad port"),
    ("redis+cluster://a/2", "database 0 only"),
    ("redis+cluster://", "no host"),
    ("redis://h:abc", "Port could not be cast"),
    ("redis://h/0?socket_timeout=x", "Invalid value"),
])
def test_unusable_urls_say_why(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse(url)


def test_keys_are_hash_tagged_on_a_cluster_only() -> None:
    one = Settings(_env_file=None, redis_url="redis://h:1")
    assert one.keys.ready == "sendscript:queue:ready"
    cluster = Settings(_env_file=None, redis_url="redis+cluster://h:1", key_prefix="app")
    assert cluster.keys.ready == "{app}:queue:ready"
    assert cluster.keys.device_lock("d") == "{app}:lock:device:d"
    assert hash_tagged("{app}") == "{app}" and hash_tagged("x:{app}") == "x:{app}"
    assert hash_tagged("a{}b") == "{a{}b}", "an empty tag tags nothing"


@pytest.mark.parametrize("role", ["master", "consumer"])
def test_a_role_given_an_unusable_url_exits_2_in_one_line(role: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDSCRIPT_")}
    env["SENDSCRIPT_REDIS_URL"] = "redis+sentinel://127.0.0.1:26379"
    done = subprocess.run([sys.executable, "-m", "sendscript", role], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "sendscript: SENDSCRIPT_REDIS_URL: name the master's service: "
        "redis+sentinel://h:p,h:p/service"]
