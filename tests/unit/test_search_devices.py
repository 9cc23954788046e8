"""A search by a list of devices (a group), the plan driven by hand: a short list is
read device by device through each device's index and merged newest first; a long
one, or one with a batch or a queue, in one read a window. Either way the page is
the same."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from console import search
from console.search import Read, SearchPage, TaskQuery, _plan, build_filter

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def _docs(devices: int, n: int) -> list[dict[str, Any]]:
    rng = random.Random(3)
    docs = []
    for i in range(n):
        at = NOW - timedelta(seconds=rng.randrange(3 * 86400))
        if i % 10 == 0:  # ties of one millisecond, across devices
            at = NOW - timedelta(hours=5)
        docs.append({"_id": f"t{i:04d}", "created_at": at, "device_id": f"d{i % devices}",
                     "batch_id": "b" if i % 3 == 0 else None,
                     "queue": "bulk" if i % 4 == 0 else "default"})
    return docs


def _matches(flt: dict[str, Any], doc: dict[str, Any]) -> bool:
    for key, want in flt.items():
        value = doc.get(key)
        if not isinstance(want, dict):
            ok = value == want
        elif "$in" in want:
            ok = value in want["$in"]
        else:
            ok = ("$gt" not in want or value > want["$gt"]) and (
                "$lt" not in want or value < want["$lt"])
        if not ok:
            return False
    return True


def _drive(q: TaskQuery, docs: list[dict[str, Any]], devices: list[str]
           ) -> tuple[SearchPage, list[Read]]:
    plan = _plan(q, build_filter(q, devices), NOW)
    reads: list[Read] = []
    read = plan.send(None)
    try:
        while True:
            reads.append(read)
            got = [d for d in docs if _matches(read.filter, d)]
            got.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
            read = plan.send((got[:read.limit] if read.limit else got, 1.0, 200.0))
    except StopIteration as done:
        return done.value, reads


def _window_reads(reads: list[Read]) -> list[Read]:
    """The windows' reads (not a cursor's ties, read by id)."""
    return [r for r in reads if r.search and "_id" not in r.filter]


def _by_window(reads: list[Read]) -> dict[datetime, list[Any]]:
    out: dict[datetime, list[Any]] = {}
    for r in _window_reads(reads):
        out.setdefault(r.filter["created_at"]["$lt"], []).append(r.filter.get("device_id"))
    return out


@pytest.mark.parametrize(("batch", "queue"), [(None, None), ("b", None), (None, "bulk")])
@pytest.mark.parametrize("listed", [1, 4, 5])
def test_a_device_list_pages_alike_however_it_is_read(
        listed: int, batch: str | None, queue: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "READ_EACH_DEVICE", 4)
    docs = _docs(devices=2 * listed + 5, n=1500)
    devices = [f"d{i}" for i in range(0, 2 * listed, 2)]
    want = sorted((d for d in docs if d["device_id"] in devices
                   and (batch is None or d["batch_id"] == batch)
                   and (queue is None or d["queue"] == queue)),
                  key=lambda d: (d["created_at"], d["_id"]), reverse=True)
    got: list[str] = []
    after = None
    seen_windows = 0
    while True:
        page, reads = _drive(TaskQuery(devices=devices, batch_id=batch, queue=queue, limit=40,
                                       after=after),
                             docs, devices)
        got += [d["_id"] for d in page.items]
        windows = _by_window(reads)
        seen_windows += len(windows)
        for named in windows.values():
            if listed <= search.READ_EACH_DEVICE and batch is None and queue is None:
                assert named == devices  # each device once, through its own index
            else:  # one read, the devices matched as it is read
                assert len(named) == 1 and not isinstance(named[0], str)
        if page.next_after is None:
            break
        after = page.next_after
    assert got == [d["_id"] for d in want]
    assert seen_windows


def test_a_device_named_twice_is_read_once() -> None:
    docs = _docs(devices=4, n=200)
    page, reads = _drive(TaskQuery(devices=["d1", "d1", "d2"], limit=200), docs,
                         ["d1", "d1", "d2"])
    assert [d["_id"] for d in page.items] == [
        d["_id"] for d in sorted((d for d in docs if d["device_id"] in ("d1", "d2")),
                                 key=lambda d: (d["created_at"], d["_id"]), reverse=True)]
    assert all(named == ["d1", "d2"] for named in _by_window(reads).values())


@pytest.mark.parametrize("extra", [0, 1])
def test_up_to_64_devices_are_read_one_by_one(extra: int) -> None:
    """The README's bound, with the real constant: 64 devices a device at a time,
    65 in whole windows."""
    assert search.READ_EACH_DEVICE == 64
    listed = search.READ_EACH_DEVICE + extra
    devices = [f"d{i}" for i in range(listed)]
    docs = _docs(devices=listed + 3, n=180)
    page, reads = _drive(TaskQuery(devices=devices, limit=200), docs, devices)
    assert [d["_id"] for d in page.items] == [
        d["_id"] for d in sorted((d for d in docs if d["device_id"] in devices),
                                 key=lambda d: (d["created_at"], d["_id"]), reverse=True)]
    for named in _by_window(reads).values():
        assert named == devices if not extra else (
            len(named) == 1 and not isinstance(named[0], str))
