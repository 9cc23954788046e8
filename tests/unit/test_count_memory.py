"""The counts keeper's memory (sendscript/counts.py, KnownBuckets): which buckets a
pass reads whole, and which it starts empty because it saw each of their tasks."""

from __future__ import annotations

from sendscript.counts import NO_TIME, KnownBuckets


def test_nothing_starts_empty_before_the_watch_begins() -> None:
    book = KnownBuckets(refresh_s=60)
    assert book.start_new({1010, 1020}, set(), now=0.0) == set()
    assert book.to_read({1010, 1020}, set(), now=0.0) == {1010, 1020}


def test_buckets_begun_after_the_watch_start_empty_and_older_ones_are_read_whole() -> None:
    book = KnownBuckets(refresh_s=60)
    book.watch_from = 1000.0
    dirty = {990, 1000, 1010, 1020, NO_TIME}
    assert book.start_new(dirty, {1020}, now=5.0) == {1010}  # 1020: retention's, read
    assert book.to_read(dirty, {1020}, now=5.0) == {990, 1000, 1020, NO_TIME}
    book.note(1010, [{"_id": "t1", "status": "pending"}, {"_id": "t2", "status": "running"}],
              now=5.0)
    assert book.tally(1010).counts == {"pending": 1, "running": 1}
    # Known now: read from memory until its memory is a refresh old, then whole.
    assert book.to_read({1010}, set(), now=30.0) == set()
    assert book.to_read({1010}, set(), now=65.0) == {1010}


def test_a_bucket_held_before_is_never_started_empty_again() -> None:
    book = KnownBuckets(refresh_s=60)
    book.watch_from = 1000.0
    assert book.start_new({1010, 1020}, set(), now=0.0) == {1010, 1020}
    book.note(1020, [{"_id": "t9", "status": "pending"}], now=50.0)
    book.forget(now=61.0)  # 1010 stopped moving a refresh ago: dropped
    assert book.to_read({1010}, set(), now=62.0) == {1010}
    assert book.start_new({1010}, set(), now=62.0) == set()  # its counts are in Redis
    assert book.start_new({1030}, set(), now=62.0) == {1030}  # a newer one starts empty
    book.clear()  # another keeper passed: the watch begins again with the next pass
    assert book.watch_from is None and book.start_new({1040}, set(), now=63.0) == set()
