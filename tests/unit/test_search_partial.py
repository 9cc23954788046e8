"""A page whose time budget runs out (pure, the plan driven by hand): it keeps what
was found, says it is partial and where it stopped, and the next page goes on from
exactly there, so nothing is skipped or read twice across the two."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from console.search import SearchPage, TaskQuery, _plan, build_filter, decode_cursor

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)


def _doc(i: int, minutes_ago: float) -> dict[str, Any]:
    return {"_id": f"t{i:03d}", "created_at": NOW - timedelta(minutes=minutes_ago),
            "run_at": NOW - timedelta(minutes=minutes_ago), "status": "pending"}


def _drive(q: TaskQuery, docs: list[dict[str, Any]], out_after: int) -> SearchPage:
    """Run the plan, answering each read from `docs` (by the read's created_at or
    run_at window) until `out_after` reads, then as a spent budget does (None)."""
    plan = _plan(q, build_filter(q), NOW)
    read = plan.send(None)
    reads = 0
    try:
        while True:
            answer = None
            named = read.filter.get("_id", {}).get("$in") if not read.budgeted else None
            if named is not None:  # the page's tasks, read by id at the end
                answer = ([d for d in docs if d["_id"] in named], 1.0, 200.0)
            elif reads < out_after:
                key = "run_at" if "run_at" in read.filter else "created_at"
                span = read.filter[key]
                top = span.get("$lt", NOW + NOW.resolution)
                got = [d for d in docs if span["$gt"] < d[key] < top]
                got.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
                answer = (got[:read.limit] if read.limit else got, 1.0, 200.0)
            reads += 1
            read = plan.send(answer)
    except StopIteration as done:
        return done.value


@pytest.mark.parametrize("statuses", [(), ("pending",)])
def test_a_spent_budget_gives_a_partial_page_that_the_next_one_continues(
        statuses: tuple[str, ...]) -> None:
    docs = [_doc(i, minutes_ago=0.5 + i * 1.5) for i in range(40)]  # one each 1.5 min
    q = TaskQuery(statuses=statuses, limit=30)
    page = _drive(q, docs, out_after=2 * max(1, len(statuses)))
    assert page.partial and page.next_after is not None
    assert page.searched_to is not None
    assert 0 < len(page.items) < 30
    # Every task newer than where it stopped is on the page, in order; none older.
    newer = [d["_id"] for d in docs if d["created_at"] >= page.searched_to]
    assert [d["_id"] for d in page.items] == newer
    at, task_id = decode_cursor(page.next_after)
    assert (at, task_id) == (page.searched_to, "")
    # The next page, given time, takes up exactly below it.
    rest = _drive(TaskQuery(statuses=statuses, limit=30, after=page.next_after), docs,
                  out_after=10_000)
    assert not rest.partial
    seen = [d["_id"] for d in page.items] + [d["_id"] for d in rest.items]
    assert seen == [d["_id"] for d in docs][:len(seen)]
    assert len(set(seen)) == len(seen)


def test_a_page_with_time_enough_is_not_partial() -> None:
    docs = [_doc(i, minutes_ago=0.5 + i * 1.5) for i in range(40)]
    page = _drive(TaskQuery(limit=30), docs, out_after=10_000)
    assert not page.partial and len(page.items) == 30
