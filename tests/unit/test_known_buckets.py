"""The counts keeper's memory of buckets it read whole (sendscript.counts.KnownBuckets):
what must be read whole again, tallies from what it remembers, and what it forgets."""

from __future__ import annotations

from datetime import UTC, datetime

from sendscript.counts import NO_TIME, KnownBuckets

PURGE = datetime(2026, 1, 1, tzinfo=UTC)


def doc(task_id: str, status: str, purge: datetime | None = None) -> dict[str, object]:
    return {"_id": task_id, "status": status, "purge_at": purge}


def test_unknown_purged_stale_and_timeless_buckets_are_read_whole() -> None:
    book = KnownBuckets(refresh_s=60)
    book.load(10, [doc("a", "pending")], now=100)
    book.load(20, [doc("b", "pending")], now=100)
    assert book.to_read({10, 20, 30}, purged=set(), now=159) == {30}
    assert book.to_read({10, 20}, purged={20}, now=159) == {20}
    assert book.to_read({10, NO_TIME}, purged=set(), now=159) == {NO_TIME}
    assert book.to_read({10, 20}, purged=set(), now=160) == {10, 20}  # a refresh old


def test_moves_noted_after_a_load_give_the_bucket_s_counts() -> None:
    book = KnownBuckets(refresh_s=60)
    book.load(10, [doc("a", "pending"), doc("b", "running"), doc("c", "success", PURGE)],
              now=0)
    book.note(10, [doc("a", "running"), doc("b", "sent"), doc("d", "pending")], now=5)
    t = book.tally(10)
    assert dict(t.counts) == {"running": 1, "sent": 1, "success": 1, "pending": 1}
    assert t.next_purge == PURGE.timestamp()
    book.note(10, [doc("c", "pending")], now=6)  # an operator's retry clears its purge
    assert book.tally(10).next_purge is None
    assert dict(book.tally(99).counts) == {}  # never read: nothing


def test_buckets_that_stop_moving_are_forgotten_and_the_size_is_bounded() -> None:
    book = KnownBuckets(refresh_s=60, most=5)
    book.load(10, [doc(f"a{i}", "pending") for i in range(3)], now=0)
    book.load(20, [doc(f"b{i}", "pending") for i in range(2)], now=0)
    book.note(20, [doc("b0", "running")], now=50)
    book.forget(now=60)  # 10 has not moved for 60 s; 20 moved at 50
    assert len(book) == 2  # bucket 20's two tasks
    assert book.tally(10).counts == {}
    book.load(30, [doc(f"c{i}", "pending") for i in range(4)], now=70)
    book.forget(now=70)  # 6 tasks > 5: the least recently moved bucket goes
    assert len(book) == 4 and book.to_read({20, 30}, purged=set(), now=70) == {20}
    book.clear()
    assert len(book) == 0
