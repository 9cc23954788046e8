"""The `sendscript` command line, run as a user runs it: real subprocesses against the
embedded servers, checking what each command prints and what it changes in Mongo
and Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest

from sendscript.client import SendScriptClient
from sendscript.dev.embedded import EmbeddedServers, free_port
from sendscript.settings import Settings
from tests.support import Inspect, Roles, settings_env, unique_settings, wait_for

pytestmark = pytest.mark.e2e

FAST = {"heartbeat_ttl_s": 2.0, "delay_load_interval_s": 1.0, "schedule_reload_s": 1.0}
WIDE = 250  # terminal width for the CLI's tables, so that no column is cut short
SCRIPT = '{"id": "open-app", "args": {"app": "maps"}}'


# -- running the CLI ------------------------------------------------------------------------


def cli_env(settings: Settings | None, columns: int = WIDE) -> dict[str, str]:
    if settings is None:  # no servers configured: what `up` and `demo` start from
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENDSCRIPT_")}
    else:
        env = settings_env(settings)
    env.pop("FORCE_COLOR", None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = str(columns)
    return env


def cli(settings: Settings | None, *args: str, timeout_s: float = 60.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sendscript", *args], env=env or cli_env(settings),
        capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
    )


def cli_many(settings: Settings, *commands: tuple[str, ...],
             timeout_s: float = 60.0) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands run at once (each run costs an interpreter start)."""
    env = cli_env(settings)
    procs = [subprocess.Popen([sys.executable, "-m", "sendscript", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for args in commands]
    results = []
    for args, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout_s)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def ok(settings: Settings | None, *args: str, **kw: Any) -> str:
    """Run a command that must succeed; its stdout, stripped."""
    result = cli(settings, *args, **kw)
    assert result.returncode == 0, (
        f"sendscript {' '.join(args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result.stdout.strip()


def oks(settings: Settings, *commands: tuple[str, ...]) -> list[str]:
    """Independent commands that must all succeed, run at once; their stdouts, stripped."""
    outs = []
    for args, result in zip(commands, cli_many(settings, *commands), strict=True):
        assert result.returncode == 0, (
            f"sendscript {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        outs.append(result.stdout.strip())
    return outs


def failed(args: tuple[str, ...] | list[str], result: subprocess.CompletedProcess[str]) -> str:
    """Check that a command failed without a traceback; its stdout and stderr, whitespace
    folded (Rich draws error messages in boxes)."""
    both = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, f"sendscript {' '.join(args)} succeeded\n{both}"
    assert "Traceback" not in result.stderr, both
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.stdout + result.stderr).split())


def fails(settings: Settings | None, *args: str, **kw: Any) -> str:
    return failed(args, cli(settings, *args, **kw))


def fails_all(settings: Settings, *commands: tuple[str, ...]) -> list[str]:
    return [failed(args, result)
            for args, result in zip(commands, cli_many(settings, *commands), strict=True)]


def submitted_id(out: str, status: str) -> str:
    m = re.fullmatch(r"([0-9a-f]{24}) " + status, out)
    assert m, out
    return m.group(1)


def batch_id_of(out: str, tasks: int, new: int) -> str:
    m = re.fullmatch(rf"batch ([0-9a-f]{{24}}): {tasks} task\(s\), {new} new", out)
    assert m, out
    return m.group(1)


def table_rows(out: str) -> list[list[str]]:
    """The body rows of the Rich tables in `out`, each a list of cell texts."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in out.splitlines() if line.lstrip().startswith("│")]


def queued_ids(inspect: Inspect) -> list[str]:
    """Task ids on the ready list, oldest first."""
    raw = inspect.redis.lrange(inspect.settings.keys.ready, 0, -1)
    return [json.loads(item)["task_id"] for item in reversed(raw)]


def status_of(inspect: Inspect, task_id: str) -> str | None:
    doc = inspect.db.script_tasks.find_one({"_id": task_id}, {"status": 1})
    return doc["status"] if doc else None


def all_in(inspect: Inspect, ids: list[str], status: str) -> bool:
    return inspect.db.script_tasks.count_documents(
        {"_id": {"$in": ids}, "status": status}) == len(ids)


# -- submit, groups and schedules: no roles needed -------------------------------------------


def test_submit_stores_tasks_and_queues_their_ids(settings: Settings, inspect: Inspect) -> None:
    tasks = inspect.db.script_tasks
    out = ok(settings, "submit", "cli-dev-1", "--script", SCRIPT, "--priority", "7",
             "--max-retries", "1", "--timeout-s", "30", "--queue", "high")
    one = submitted_id(out, "pending")
    doc = tasks.find_one({"_id": one})
    assert doc is not None
    assert doc["device_id"] == "cli-dev-1"
    assert doc["script"] == {"id": "open-app", "args": {"app": "maps"}}
    assert (doc["priority"], doc["max_retries"], doc["timeout_s"], doc["queue"]) == (
        7, 1, 30.0, "high")
    assert doc["status"] == "pending" and doc["attempt"] == 0
    assert queued_ids(inspect) == [one]

    # Independent submissions, run at once.
    spread_out, single_out, first_out, later_out, _ = oks(
        settings,
        # --count N --devices K: round-robin over K devices named by --device-prefix.
        ("submit", "--count", "10", "--devices", "3", "--device-prefix", "cnt-"),
        # --count on one named device puts all of them there.
        ("submit", "cli-dev-2", "--count", "3"),
        ("submit", "dd-dev", "--dedupe-key", "order-1"),
        # A later --run-at is stored as waiting (and queued for a master to hold).
        ("submit", "later-dev", "--run-at", str(time.time() + 3600)),
        ("group", "add", "rack-a", "r-1", "r-2", "r-3"),
    )
    assert spread_out == "submitted 10 tasks over 3 device(s)"
    spread = list(tasks.find({"device_id": {"$regex": "^cnt-"}}))
    assert Counter(t["device_id"] for t in spread) == {"cnt-0": 4, "cnt-1": 3, "cnt-2": 3}
    assert {t["status"] for t in spread} == {"pending"}
    assert {t["script"]["id"] for t in spread} == {"demo"}  # the default script
    assert single_out == "submitted 3 tasks over 1 device(s)"
    assert tasks.count_documents({"device_id": "cli-dev-2"}) == 3
    later = submitted_id(later_out, "waiting")
    assert status_of(inspect, later) == "waiting"
    first = submitted_id(first_out, "pending")

    # The same dedupe key again; fan-outs to a stored group and to a device list
    # (named twice, one task).
    again, group_out, list_out = oks(
        settings,
        ("submit", "dd-dev", "--dedupe-key", "order-1"),
        ("submit", "--group", "rack-a", "--script", SCRIPT),
        ("submit", "--device-list", "l-1, l-2,l-1"),
    )
    assert again == f"{first} pending (existing task with this dedupe key)"
    assert tasks.count_documents({"dedupe_key": "order-1"}) == 1
    assert queued_ids(inspect).count(first) == 1  # not queued twice
    group_batch = batch_id_of(group_out, 3, 3)
    members = list(tasks.find({"batch_id": group_batch}))
    assert sorted(t["device_id"] for t in members) == ["r-1", "r-2", "r-3"]
    assert all(t["script"]["args"] == {"app": "maps"} for t in members)
    list_batch = batch_id_of(list_out, 2, 2)
    assert list_batch != group_batch
    assert sorted(t["device_id"] for t in tasks.find({"batch_id": list_batch})) == [
        "l-1", "l-2"]

    # Everything stored was queued once; `status` reports that queue without a master.
    stored = {t["_id"] for t in tasks.find({}, {"_id": 1})}
    queued = queued_ids(inspect)
    assert len(queued) == len(set(queued)) == len(stored) == 1 + 10 + 3 + 1 + 1 + 3 + 2
    assert set(queued) == stored
    info = json.loads(ok(settings, "status", "--json"))
    assert info["queue_ready"] == len(stored)
    assert info["tasks"] == {"pending": len(stored) - 1, "waiting": 1}
    assert info["workers_alive"] == 0 and info["masters"] == [] and info["consumers"] == []


def test_submit_refuses_bad_input_and_stores_nothing(
    settings: Settings, inspect: Inspect
) -> None:
    one, fanout, nothing, no_group = fails_all(
        settings,
        ("submit", "cli-dev", "--script", "{not json"),
        ("submit", "--device-list", "a,b", "--script", "{not json"),
        ("submit",),
        ("submit", "--group", "no-such-group"),
    )
    assert "--script is not JSON" in one
    assert "--script is not JSON" in fanout
    assert "name a device" in nothing
    assert "device group 'no-such-group' is unknown or empty" in no_group
    assert inspect.db.script_tasks.count_documents({}) == 0
    assert inspect.redis.llen(settings.keys.ready) == 0


def test_submit_refuses_an_invalid_spec_with_a_clear_error(
    settings: Settings, inspect: Inspect
) -> None:
    not_object, too_high = fails_all(
        settings,
        ("submit", "cli-dev", "--script", '"just a string"'),
        ("submit", "cli-dev", "--priority", "99"),
    )
    assert "script" in not_object
    assert "priority" in too_high
    assert inspect.db.script_tasks.count_documents({}) == 0


def test_task_list_shows_whole_task_ids_at_80_columns(
    settings: Settings, inspect: Inspect
) -> None:
    task_id = submitted_id(ok(settings, "submit", "narrow-dev"), "pending")
    out = ok(settings, "task", "list", env=cli_env(settings, columns=80))
    assert task_id in out


def test_groups(settings: Settings, inspect: Inspect) -> None:
    groups = inspect.db.device_groups
    assert ok(settings, "group", "add", "rack-1", "p-1", "p-2") == "group rack-1: 2 device(s)"
    assert oks(settings, ("group", "add", "rack-1", "p-2", "p-3", "p-4"),
               ("group", "add", "rack-2", "q-1")) == [
        "group rack-1: 4 device(s)", "group rack-2: 1 device(s)"]
    doc = groups.find_one({"_id": "rack-1"})
    assert doc is not None and doc["devices"] == ["p-1", "p-2", "p-3", "p-4"]

    rows = table_rows(ok(settings, "group", "list"))
    assert rows == [["rack-1", "4", "p-1, p-2, p-3, p-4"], ["rack-2", "1", "q-1"]]

    assert ok(settings, "group", "remove", "rack-1", "p-1", "p-3") == (
        "group rack-1: removed 2 device(s)")
    doc = groups.find_one({"_id": "rack-1"})
    assert doc is not None and doc["devices"] == ["p-2", "p-4"]
    assert table_rows(ok(settings, "group", "list"))[0] == ["rack-1", "2", "p-2, p-4"]

    assert ok(settings, "group", "remove", "rack-1") == "group rack-1: removed"
    assert groups.find_one({"_id": "rack-1"}) is None
    assert [r[0] for r in table_rows(ok(settings, "group", "list"))] == ["rack-2"]

    gone, ghost, bad_name = fails_all(
        settings,
        ("group", "remove", "rack-1"),
        ("group", "remove", "ghost", "p-1"),
        ("group", "add", "bad name!", "p-1"),
    )
    assert "no group rack-1" in gone
    assert "no group ghost" in ghost
    assert "invalid group name" in bad_name
    assert groups.count_documents({}) == 1


def test_schedule_commands(settings: Settings, inspect: Inspect) -> None:
    schedules = inspect.db.schedules
    before = datetime.now(UTC)
    out, nightly_out, _ = oks(
        settings,
        ("schedule", "add", "tick", "--script", SCRIPT, "--every", "1",
         "--device", "s-1", "--device", "s-2", "--priority", "8"),
        ("schedule", "add", "nightly", "--script", SCRIPT, "--cron", "30 2 * * *",
         "--tz", "Asia/Shanghai", "--group", "night-rack", "--paused"),
        ("group", "add", "night-rack", "n-1"),
    )
    doc = schedules.find_one({"_id": "tick"})
    assert doc is not None
    assert doc["interval_s"] == 1.0 and doc["cron"] is None
    assert doc["device_ids"] == ["s-1", "s-2"] and doc["enabled"] is True
    assert doc["template"]["script"] == json.loads(SCRIPT)
    assert doc["template"]["priority"] == 8
    first_fire = doc["next_fire_at"].replace(tzinfo=UTC)
    assert before < first_fire <= datetime.now(UTC) + timedelta(seconds=1)
    assert out == f"schedule tick added; next fire {first_fire}"
    nightly = schedules.find_one({"_id": "nightly"})
    assert nightly is not None and nightly["enabled"] is False
    assert nightly["group"] == "night-rack" and nightly["device_ids"] is None
    nightly_fire = nightly["next_fire_at"].replace(tzinfo=UTC)
    assert nightly_fire.strftime("%H:%M") == "18:30"  # 02:30 in Shanghai
    assert nightly_out == f"schedule nightly added; next fire {nightly_fire}"

    listed, shown_out = oks(settings, ("schedule", "list"), ("schedule", "show", "tick"))
    rows = {r[0]: r for r in table_rows(listed)}
    assert set(rows) == {"nightly", "tick"}
    assert rows["tick"][1:4] == ["every 1s (UTC)", "s-1, s-2", "yes"]
    assert rows["tick"][6:] == ["0", "0"]  # fires, missed
    assert rows["nightly"][1:4] == ["30 2 * * * (Asia/Shanghai)", "group night-rack", "paused"]
    shown = json.loads(shown_out)
    assert shown["_id"] == "tick" and shown["interval_s"] == 1.0
    assert shown["device_ids"] == ["s-1", "s-2"] and shown["fires"] == 0

    assert ok(settings, "schedule", "pause", "tick") == "schedule tick: paused"
    assert schedules.find_one({"_id": "tick"})["enabled"] is False
    assert table_rows(ok(settings, "schedule", "list"))[1][3] == "paused"
    resumed_at = datetime.now(UTC)
    assert first_fire < resumed_at  # resuming starts from now, not from the old fire time
    assert ok(settings, "schedule", "resume", "tick") == "schedule tick: resumed"
    doc = schedules.find_one({"_id": "tick"})
    assert doc["enabled"] is True
    assert doc["next_fire_at"].replace(tzinfo=UTC) > resumed_at

    # Refused: a bad cron expression, a duplicate name, no target, unknown names.
    bad_cron, duplicate, aimless, no_json = fails_all(
        settings,
        ("schedule", "add", "broken", "--script", SCRIPT, "--cron", "61 * * * *",
         "--device", "s-1"),
        ("schedule", "add", "tick", "--script", '{"id": "other"}', "--every", "5",
         "--device", "s-9"),
        ("schedule", "add", "aimless", "--script", SCRIPT, "--every", "5"),
        ("schedule", "add", "nojson", "--script", "{", "--every", "5", "--device", "s-1"),
    )
    assert "invalid cron expression '61 * * * *'" in bad_cron
    assert "a schedule named 'tick' exists" in duplicate
    assert "target exactly one of" in aimless
    assert "--script is not JSON" in no_json
    assert schedules.count_documents({}) == 2
    assert schedules.find_one({"_id": "tick"})["template"]["script"] == json.loads(SCRIPT)

    assert ok(settings, "schedule", "remove", "tick") == "schedule tick: removed"
    assert schedules.find_one({"_id": "tick"}) is None
    actions = ("show", "pause", "resume", "remove")
    for text in fails_all(settings, *[("schedule", action, "tick") for action in actions]):
        assert "no schedule tick" in text
    assert [r[0] for r in table_rows(ok(settings, "schedule", "list"))] == ["nightly"]


# -- demo and up: the CLI starting everything itself -----------------------------------------


def test_demo(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    result = cli(None, "demo", "--tasks", "60", "--devices", "6", "--data-dir", str(data_dir),
                 timeout_s=150)
    out = result.stdout
    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr[-3000:]}"
    assert "demo passed" in out
    rows = {r[0]: r[1] for r in table_rows(out) if len(r) == 2}
    assert rows["tasks"] == "60" and rows["success"] == "60" and rows["not finished"] == "0"
    assert rows["scripts the farm ran"] == "60" and rows["overlaps seen by the farm"] == "0"
    assert not data_dir.exists()  # removed after a passing run


def test_up_runs_everything_and_stops_cleanly_on_sigint(tmp_path: Path) -> None:
    env = cli_env(None)
    env.pop("COLUMNS")  # as a user would see it
    env.update(SENDSCRIPT_DATA_DIR=str(tmp_path / "data"), SENDSCRIPT_WORKERS="2",
               SENDSCRIPT_HEARTBEAT_INTERVAL_S="0.5", PYTHONUNBUFFERED="1",
               # the default ports may be taken (another test's up or supervisord)
               SENDSCRIPT_CONSOLE_PORT=str(free_port()),
               SENDSCRIPT_AGENTS_PORT=str(free_port()))
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        up = subprocess.Popen([sys.executable, "-m", "sendscript", "up", "--run-ms", "50"],
                              env=env, cwd=tmp_path, stdout=out, stderr=err,
                              stdin=subprocess.DEVNULL, text=True)
    children: list[psutil.Process] = []
    try:
        def started() -> bool:
            assert up.poll() is None, f"up exited {up.returncode}:\n{err_path.read_text()}"
            return "Ctrl-C stops everything." in out_path.read_text()

        wait_for(started, 90, "`sendscript up` to start", 0.2)
        banner = " ".join(out_path.read_text().split())
        urls = {name: re.search(rf"\b{name} ({scheme}://[^, ]+)", banner)
                for name, scheme in (("redis", "redis"), ("mongo", "mongodb"),
                                     ("pulsar", "pulsar"), ("central", "http"))}
        assert all(urls.values()), banner
        settings = Settings(**{f"{name}_url": m.group(1) for name, m in urls.items() if m})
        assert f"data in {tmp_path / 'data'}" in banner

        children = psutil.Process(up.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        for role in ("redis-server", "sendscript.dev.embedded mongo", "pulsar-lite",
                     "sendscript simulate", "sendscript consumer", "sendscript master",
                     "sendscript console"):
            assert any(role in c for c in commands), (role, commands)
        assert sum("spawn_main" in c for c in commands) == 2, commands  # the workers
        assert all(os.getsid(c.pid) == c.pid for c in psutil.Process(up.pid).children())

        info = json.loads(ok(settings, "status", "--json"))
        assert info["workers_alive"] == 2
        assert [c["alive"] for c in info["consumers"]] == [True]
        task_id = submitted_id(ok(settings, "submit", "up-dev", "--script", SCRIPT), "pending")
        with SendScriptClient(settings) as client:
            wait_for(lambda: (t := client.get(task_id)) is not None and t.status == "success",
                     30, "the task to succeed")
            assert [r["status"] for r in client.records(task_id)] == ["success"]

        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, err_path.read_text()[-3000:]
        assert out_path.read_text().rstrip().endswith("stopped")
        _gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


# -- with the roles running: one set shared by the tests below -------------------------------


@dataclass
class Live:
    settings: Settings
    roles: Roles
    inspect: Inspect


@pytest.fixture(scope="module")
def live(servers: EmbeddedServers, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[Live]:
    settings = unique_settings(servers, **FAST)
    roles = Roles(settings, tmp_path_factory.mktemp("cli-roles"))
    view = Inspect(settings)
    failed_before = request.session.testsfailed
    try:
        roles.simulator(run_ms=50, jitter=0.2, progress=False)
        roles.consumer()
        roles.master()
        yield Live(settings, roles, view)
    finally:
        roles.stop()
        view.close()
        if request.session.testsfailed > failed_before:
            print(roles.logs())


def test_submitted_tasks_succeed_and_task_commands_show_them(live: Live) -> None:
    settings, inspect = live.settings, live.inspect
    one_out, _ = oks(
        settings,
        ("submit", "live-1", "--script", SCRIPT),
        ("submit", "--count", "6", "--devices", "3", "--device-prefix", "live-n-"),
    )
    one = submitted_id(one_out, "pending")
    many = [t["_id"] for t in inspect.db.script_tasks.find({"device_id": {"$regex": "^live-n-"}})]
    assert len(many) == 6
    every = [one, *many]
    wait_for(lambda: all_in(inspect, every, "success"), 30, "the submitted tasks to succeed")

    info, unknown, success, pending, newest = cli_many(
        settings,
        ("task", "info", one),
        ("task", "info", "0000"),
        ("task", "list", "--status", "success"),
        ("task", "list", "--status", "pending"),
        ("task", "list", "--limit", "2"),
    )
    assert info.returncode == 0, info.stderr
    task, end = json.JSONDecoder().raw_decode(info.stdout.strip())
    assert task["_id"] == one and task["device_id"] == "live-1"
    assert task["status"] == "success" and task["attempt"] == 1
    assert task["script"] == json.loads(SCRIPT)
    records = list(inspect.db.task_exec_records.find({"task_id": one}))
    assert len(records) == 1
    assert "exec records" in info.stdout.strip()[end:]
    rows = table_rows(info.stdout.strip()[end:])
    assert len(rows) == 1
    attempt, record_id, worker, lock, status = rows[0][:5]
    assert (attempt, record_id, worker, lock, status) == (
        "1", records[0]["_id"], records[0]["worker"], str(records[0]["lock_value"]), "success")
    assert all(rows[0][5:8]), rows[0]  # started, sent and finished times
    assert "no task 0000" in failed(("task", "info", "0000"), unknown)

    for result in (success, pending, newest):
        assert result.returncode == 0, result.stderr
    listed = {r[0]: r for r in table_rows(success.stdout)}
    assert set(every) <= set(listed)
    assert {r[2] for r in listed.values()} == {"success"}
    assert listed[one][1] == "live-1"
    assert not set(every) & {r[0] for r in table_rows(pending.stdout)}
    assert len(table_rows(newest.stdout)) == 2


def test_status_shows_queue_tasks_locks_workers_and_consumers(live: Live) -> None:
    settings, inspect = live.settings, live.inspect
    live.roles.configure_farm(run_ms=10_000, jitter=0)
    try:
        busy = submitted_id(ok(settings, "submit", "status-dev"), "pending")
        wait_for(lambda: status_of(inspect, busy) == "sent", 15, "the task to be sent")
    finally:
        live.roles.configure_farm(run_ms=50, jitter=0.2)
    locks = list(inspect.redis.scan_iter(match=settings.keys.device_lock_pattern))
    assert locks == [settings.keys.device_lock("status-dev").encode()]

    # Tasks per status are kept by the leader a few seconds behind the tasks: wait
    # until the kept counts have caught up with the collection, then read status.
    def counted() -> bool:
        return json.loads(ok(settings, "status", "--json"))["tasks"] == inspect.counts()

    wait_for(counted, 30, "the kept task counts to catch up")
    as_json, out = oks(settings, ("status", "--json"), ("status",))
    info = json.loads(as_json)
    assert info["queue_ready"] == inspect.redis.llen(settings.keys.ready) == 0
    assert info["queue_quarantine"] == 0
    assert info["tasks"] == inspect.counts()
    assert info["tasks"]["sent"] == 1
    assert info["locks_held"] == 1
    assert info["workers_alive"] == settings.workers
    assert [(m["master_id"], m["alive"]) for m in info["masters"]] == [
        (settings.master_id, True)]
    assert len(info["consumers"]) == 1 and info["consumers"][0]["alive"] is True

    assert re.search(r"ready queue: 0 +quarantine: 0 +device locks held: 1 +"
                     rf"workers alive: {settings.workers}\b", out), out
    rows = table_rows(out)
    assert ["sent", "1"] in rows
    master_row = next(r for r in rows if r[0] == settings.master_id)
    assert master_row[1:3] == ["yes", f"{settings.workers}/{settings.workers}"]
    assert any(r[1] == "yes" and r[0] == info["consumers"][0]["name"] for r in rows)

    # A task already sent can be cancelled: its result will not be applied.
    assert ok(settings, "task", "cancel", busy) == f"{busy} cancelled (was sent)"
    assert status_of(inspect, busy) == "cancelled"


def test_task_cancel(live: Live) -> None:
    settings, inspect = live.settings, live.inspect
    delayed_out, done_out = oks(
        settings,
        ("submit", "cx-later", "--run-at", str(time.time() + 120)),
        ("submit", "cx-done"),
    )
    delayed, done = submitted_id(delayed_out, "waiting"), submitted_id(done_out, "pending")
    wait_for(lambda: status_of(inspect, done) == "success", 20, "the task to finish")

    assert ok(settings, "task", "cancel", delayed) == f"{delayed} cancelled (was waiting)"
    doc = inspect.db.script_tasks.find_one({"_id": delayed})
    assert doc["status"] == "cancelled" and doc["last_error"] == "cancelled"

    finished, again, unknown = fails_all(
        settings,
        ("task", "cancel", done),
        ("task", "cancel", delayed),  # cancelled is final too
        ("task", "cancel", "0000"),
    )
    assert f"{done} had already finished; nothing to cancel" in finished
    assert f"{delayed} had already finished; nothing to cancel" in again
    assert "no task 0000" in unknown
    assert status_of(inspect, done) == "success"
    assert status_of(inspect, delayed) == "cancelled"


def test_batch_info_and_cancel(live: Live) -> None:
    settings, inspect = live.settings, live.inspect
    ok(settings, "group", "add", "live-rack", "lr-1", "lr-2", "lr-3")
    done_out, later_out = oks(
        settings,
        ("submit", "--group", "live-rack"),
        ("submit", "--device-list", "lw-1,lw-2,lw-3", "--run-at", str(time.time() + 120)),
    )
    done, later = batch_id_of(done_out, 3, 3), batch_id_of(later_out, 3, 3)
    ids = [t["_id"] for t in inspect.db.script_tasks.find({"batch_id": done})]
    wait_for(lambda: all_in(inspect, ids, "success"), 20, "the group batch to succeed")

    done_info, later_info = oks(settings, ("batch", "info", done), ("batch", "info", later))
    assert table_rows(done_info) == [["success", "3"], ["total", "3"]]
    assert table_rows(later_info) == [["waiting", "3"], ["total", "3"]]

    assert ok(settings, "batch", "cancel", later) == f"cancelled 3 task(s) of batch {later}"
    assert {t["status"] for t in inspect.db.script_tasks.find({"batch_id": later})} == {
        "cancelled"}
    later_info, later_again, done_cancel, unknown = cli_many(
        settings,
        ("batch", "info", later),
        ("batch", "cancel", later),
        ("batch", "cancel", done),
        ("batch", "info", "0000"),
    )
    assert table_rows(later_info.stdout) == [["cancelled", "3"], ["total", "3"]]
    assert later_again.stdout.strip() == f"cancelled 0 task(s) of batch {later}"
    assert done_cancel.stdout.strip() == f"cancelled 0 task(s) of batch {done}"
    assert all_in(inspect, ids, "success")
    assert "no batch 0000" in failed(("batch", "info", "0000"), unknown)


def test_interval_schedule_fires_through_the_master(live: Live) -> None:
    settings, inspect = live.settings, live.inspect
    ok(settings, "schedule", "add", "every-second", "--script", SCRIPT, "--every", "1",
       "--device", "sched-1", "--device", "sched-2")

    def fired() -> list[dict[str, Any]]:
        return list(inspect.db.script_tasks.find({"schedule": "every-second"}))

    wait_for(lambda: sum(t["status"] == "success" for t in fired()) >= 4, 20,
             "scheduled tasks to run")
    tasks = fired()
    assert {t["device_id"] for t in tasks} == {"sched-1", "sched-2"}
    assert all(t["script"] == json.loads(SCRIPT) for t in tasks)
    row = next(r for r in table_rows(ok(settings, "schedule", "list"))
               if r[0] == "every-second")
    assert row[3] == "yes" and int(row[6]) >= 2 and row[5]  # fires, last fire

    # Paused through the CLI, the running master stops firing it. A canary added after
    # the pause shows the master's scheduler has loaded the schedules since (it loads
    # them again after every fire) and goes on running while the paused one stays quiet.
    ok(settings, "schedule", "pause", "every-second")
    ok(settings, "schedule", "add", "canary", "--script", SCRIPT, "--every", "1",
       "--device", "sched-3")

    def canary() -> int:
        return int(inspect.db.script_tasks.count_documents({"schedule": "canary"}))

    wait_for(lambda: canary() >= 2, 20, "the canary to fire twice after the pause")
    count = len(fired())
    wait_for(lambda: canary() >= 5, 20, "three more canary fires")
    assert len(fired()) == count
    ok(settings, "schedule", "remove", "canary")
    ok(settings, "schedule", "remove", "every-second")
