"""The hosts the multi-host run is made of: a namespace reaches the bridge and no more
while its link is down; a host's CPU quota holds its programs and what they spawn
(a master's worker processes); a run killed before its cleanup is cleaned up by the
next one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from sendscript.dev.hosts import (
    CpuQuota,
    Hosts,
    cpu_quota_backend,
    remove_abandoned,
    unavailable,
)

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    with Hosts(["a", "b"], cpu={"a": 0.05}) as made:
        yield made


def _listen(host: str) -> tuple[socket.socket, int]:
    server = socket.create_server((host, 0))
    server.settimeout(0.5)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed: the test is over
                return
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


def _connects(hosts: Hosts, name: str, port: int) -> bool:
    probe = (f"import socket; socket.create_connection(('{hosts.bridge_ip}', {port}), "
             "timeout=2).close()")
    done = subprocess.run(hosts.command(name, [sys.executable, "-c", probe]),
                          capture_output=True, timeout=30)
    return done.returncode == 0


def test_a_host_reaches_the_bridge_until_its_link_goes_down(hosts: Hosts) -> None:
    server, port = _listen(hosts.bridge_ip)
    try:
        assert _connects(hosts, "b", port)
        hosts.link_down("b")
        assert not _connects(hosts, "b", port)
        assert _connects(hosts, "a", port), "the other host is not cut off"
        hosts.link_up("b")
        assert _connects(hosts, "b", port)
    finally:
        server.close()


SPAWNS_A_BUSY_CHILD = textwrap.dedent("""
    import multiprocessing as mp, sys, time

    def spin():
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass

    if __name__ == "__main__":
        child = mp.get_context("spawn").Process(target=spin)
        child.start()
        print(child.pid, flush=True)
        sys.stdin.readline()  # the test has looked at the cgroup
        child.join()
""")


def test_a_hosts_quota_holds_what_its_programs_spawn(hosts: Hosts) -> None:
    if hosts.quota is None:
        pytest.skip(f"no CPU quota on this machine: {hosts.quota_refused}")
    group = hosts.groups["a"]
    proc = subprocess.Popen(hosts.command("a", [sys.executable, "-c", SPAWNS_A_BUSY_CHILD]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        child = int(proc.stdout.readline())
        members = {int(p) for p in (group / "cgroup.procs").read_text().split()}
        assert {proc.pid, child} <= members
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    # 1.5 s of spinning under a 0.05-CPU quota: the quota must have stopped it.
    assert CpuQuota.stat(group)["nr_throttled"] > 0


MAKES_HOSTS_AND_DIES = textwrap.dedent("""
    import os, signal
    from sendscript.dev.hosts import Hosts

    hosts = Hosts(["x"], cpu={"x": 0.1})
    hosts.start()
    print(hosts.tag, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_run_killed_before_its_cleanup_is_removed_by_the_next() -> None:
    done = subprocess.run([sys.executable, "-c", MAKES_HOSTS_AND_DIES], capture_output=True,
                          text=True, timeout=60, env={**os.environ})
    assert done.returncode == -signal.SIGKILL, done.stderr
    tag = done.stdout.strip()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"ss-{tag}-x" in netns
    remove_abandoned()  # another run starting meanwhile may be the one that removes it
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"ss-{tag}-x" not in netns and f"ssbr{tag}" not in links
    backend = cpu_quota_backend()
    if isinstance(backend, CpuQuota):
        assert not list(backend.root.glob(f"sendscript-{tag}-*"))
