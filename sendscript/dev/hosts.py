"""Hosts on one machine, for the multi-host trials: each a Linux network namespace
joined by a veth pair to a bridge in the root namespace, with a CPU quota of its own.

    with Hosts(["m1", "m2", "c1"], cpu={"m1": 0.2, "m2": 0.2}) as hosts:
        hosts.bridge_ip                    # where the servers listen (root namespace)
        hosts.command("m1", [python, "-m", "sendscript", "master"])  # argv to run in m1
        hosts.link_down("m1"); hosts.link_up("m1")                  # a partition, healed

The subnet is private (10.251.N.0/24, N unused on this machine) and lives only on the
bridge made here; nothing is routed outward (the namespaces have no default route).
Everything made here is removed on exit, failure or not: processes still in a host's
cgroup are killed first, since a cgroup with members cannot be removed.

CPU quotas use cgroup v2 `cpu.max` where the unified hierarchy has the cpu controller,
else cgroup v1 `cpu.cfs_quota_us` (a hybrid host binds cpu to v1, and v2 then cannot
take it); where neither can be written (a read-only cgroup mount in a container) the
hosts run without quotas and `quota_refused` says why. Root and `ip` (iproute2) are
needed, and a kernel and privileges that let them make a namespace, a bridge and a
veth pair: `unavailable()` tries exactly that once and says why not.

The bridge carries the pid of the process that made it (its alias): a run killed
before it could clean up (SIGKILL, a test timeout) leaves a bridge, namespaces and
cgroups whose owner is dead, and the next run removes them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
SUBNET_BASE = "10.251"
ALIAS = "sendscript-hosts pid "
# Held while a subnet is picked and claimed: two runs at once on one machine (tests in
# parallel) would otherwise both see N free and put the same subnet on two bridges.
LOCK_PATH = (Path("/run") if Path("/run").is_dir() else Path("/tmp")) / "sendscript-hosts.lock"


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    return _probe()


@functools.cache
def _probe() -> str | None:
    """Make and remove a namespace, a bridge and a veth pair: the kernel (bridge, veth
    modules) and the privileges (CAP_SYS_ADMIN, CAP_NET_ADMIN) either allow it or the
    failing command's message says why not."""
    tag = f"ssprobe{os.getpid() % 100000}"
    steps = [("netns", "add", tag), ("link", "add", tag + "b", "type", "bridge"),
             ("link", "add", tag + "v", "type", "veth", "peer", "name", tag + "p"),
             ("link", "set", tag + "v", "netns", tag)]
    try:
        for step in steps:
            done = ip(*step, check=False)
            if done.returncode != 0:
                return f"`ip {' '.join(step)}` failed: {done.stderr.strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip` could not run: {exc!r}"
    finally:
        ip("link", "del", tag + "p", check=False)
        ip("link", "del", tag + "b", check=False)
        ip("netns", "del", tag, check=False)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True,
                          timeout=20)


def free_subnet(used: str) -> int:
    """A third octet N such that 10.251.N.0/24 appears nowhere in `ip -4 addr`'s text."""
    for n in range(1, 255):
        if f"{SUBNET_BASE}.{n}." not in used:
            return n
    raise RuntimeError(f"no free {SUBNET_BASE}.N.0/24 subnet")


@dataclass(frozen=True)
class CpuQuota:
    """Where a CPU quota is written: cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us`."""

    version: int
    root: Path  # the hierarchy holding the cpu controller

    def create(self, name: str, cpus: float) -> Path:
        group = self.root / name
        group.mkdir()
        self.set(group, cpus)
        return group

    def set(self, group: Path, cpus: float) -> None:
        """The group's quota, now: members keep running under the new one."""
        quota = max(1000, int(cpus * PERIOD_US))
        if self.version == 2:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}\n")
        else:
            (group / "cpu.cfs_period_us").write_text(f"{PERIOD_US}\n")
            (group / "cpu.cfs_quota_us").write_text(f"{quota}\n")

    @staticmethod
    def stat(group: Path) -> dict[str, int]:
        """The group's `cpu.stat` (both versions count periods and throttled ones)."""
        out = {}
        for line in (group / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out


def cpu_quota_backend(root: Path = CGROUP_ROOT) -> CpuQuota | str:
    """The writable cgroup hierarchy with a cpu controller, or why there is none."""
    unified = root if (root / "cgroup.controllers").exists() else root / "unified"
    controllers = unified / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        try:
            subtree = unified / "cgroup.subtree_control"
            if "cpu" not in subtree.read_text().split():
                subtree.write_text("+cpu\n")
            return CpuQuota(2, unified)
        except OSError as exc:
            return f"cgroup v2 at {unified} has cpu but +cpu is refused: {exc}"
    v1 = root / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        if os.access(v1, os.W_OK):
            return CpuQuota(1, v1)
        return f"cgroup v1 cpu at {v1} is not writable"
    why = (f"{controllers} lists no cpu controller" if controllers.exists()
           else f"no cgroup v2 at {unified}")
    return f"{why}, and no cgroup v1 cpu hierarchy at {v1}"


class Hosts:
    """Network namespaces on one bridge, each with an optional CPU quota (in CPUs)."""

    def __init__(self, names: Sequence[str], cpu: dict[str, float] | None = None) -> None:
        if why := unavailable():
            raise RuntimeError(why)
        self.tag = uuid.uuid4().hex[:6]
        self.names = list(names)
        self.cpu = dict(cpu or {})
        self.bridge = f"ssbr{self.tag}"
        self.net = 0
        self.netns: dict[str, str] = {n: f"ss-{self.tag}-{n}" for n in self.names}
        self.veth: dict[str, str] = {n: f"ss{self.tag}{i}" for i, n in enumerate(self.names)}
        self.groups: dict[str, Path] = {}
        self.quota: CpuQuota | None = None
        self.quota_refused: str | None = None  # why no quota could be set, if so

    @property
    def bridge_ip(self) -> str:
        return f"{SUBNET_BASE}.{self.net}.1"

    def address(self, name: str) -> str:
        return f"{SUBNET_BASE}.{self.net}.{11 + self.names.index(name)}"

    def start(self) -> None:
        try:
            self._network()
            self._cgroups()
        except Exception:
            self.stop()
            raise

    def _network(self) -> None:
        with _machine_lock():
            remove_abandoned()
            self.net = free_subnet(ip("-4", "addr").stdout)
            ip("link", "add", self.bridge, "type", "bridge")
            ip("link", "set", self.bridge, "alias", f"{ALIAS}{os.getpid()}")
            ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns, veth, peer = self.netns[name], self.veth[name], self.veth[name] + "p"
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "master", self.bridge)
            ip("link", "set", peer, "up")
            ip("link", "set", veth, "netns", ns)
            ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", veth)
            ip("-n", ns, "link", "set", veth, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def _cgroups(self) -> None:
        if not self.cpu:
            return
        backend = cpu_quota_backend()
        if isinstance(backend, str):
            self.quota_refused = backend
            return
        try:
            for name, cpus in self.cpu.items():
                self.groups[name] = backend.create(f"sendscript-{self.tag}-{name}", cpus)
        except OSError as exc:  # e.g. a cgroup mount that is read-only here
            for group in self.groups.values():
                _remove_group(group)
            self.groups.clear()
            self.quota_refused = f"cannot make a cgroup under {backend.root}: {exc}"
            return
        self.quota = backend

    def set_cpu(self, name: str, cpus: float) -> None:
        """Change host `name`'s CPU quota (a no-op where no quota could be set)."""
        group = self.groups.get(name)
        if group is not None and self.quota is not None:
            self.quota.set(group, cpus)
            self.cpu[name] = cpus

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """argv run in host `name`: inside its cgroup (children too), then its namespace.
        `exec` all the way down, so the pid is the program's own."""
        inner = ["ip", "netns", "exec", self.netns[name], *argv]
        group = self.groups.get(name)
        if group is None:
            return inner
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *inner]

    def link_down(self, name: str) -> None:
        """Cut host `name` off: its side of the veth pair goes down (sockets stay open,
        packets go nowhere), as a failed switch port would."""
        ip("-n", self.netns[name], "link", "set", self.veth[name], "down")

    def link_up(self, name: str) -> None:
        ip("-n", self.netns[name], "link", "set", self.veth[name], "up")

    def throttled(self, name: str) -> tuple[int, int] | None:
        """(periods, periods throttled) of host `name`'s quota: the quota binds when
        most periods are throttled."""
        group = self.groups.get(name)
        if group is None:
            return None
        stat = CpuQuota.stat(group)
        return stat.get("nr_periods", 0), stat.get("nr_throttled", 0)

    def stop(self) -> None:
        """Remove what was made; each step tolerates what an earlier failure left."""
        for group in self.groups.values():
            _remove_group(group)
        self.groups.clear()
        for name in self.names:
            _remove_netns(self.netns[name])
        ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> Hosts:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    with open(LOCK_PATH, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_abandoned() -> list[str]:
    """Remove the bridges, namespaces and cgroups of runs whose process is dead; the
    tags removed."""
    removed = []
    for line in ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":", 2)[1].strip().split("@")[0]
        alias = line.partition(f"alias {ALIAS}")[2].split()
        if not name.startswith("ssbr") or not alias or not alias[0].isdigit():
            continue
        if _alive(int(alias[0])):
            continue
        tag = name.removeprefix("ssbr")
        for ns in ip("netns", "list", check=False).stdout.split():
            if ns.startswith(f"ss-{tag}-"):
                _remove_netns(ns)
        backend = cpu_quota_backend()
        if isinstance(backend, CpuQuota):
            for group in backend.root.glob(f"sendscript-{tag}-*"):
                _remove_group(group)
        ip("link", "del", name, check=False)
        removed.append(tag)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_group(group: Path) -> None:
    """Kill the group's members, then remove it (a cgroup with members cannot go)."""
    _kill_members(group)
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # members still exiting
            time.sleep(0.1)


def _remove_netns(ns: str) -> None:
    _kill_netns_members(ns)
    ip("netns", "del", ns, check=False)  # takes its veth along


def _kill_members(group: Path) -> None:
    try:
        pids = (group / "cgroup.procs").read_text().split()
    except OSError:
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _kill_netns_members(ns: str) -> None:
    pids = ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
