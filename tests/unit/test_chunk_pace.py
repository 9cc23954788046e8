"""How much of a fan-out an intake round stores: a small first chunk, then what the
store does in the budget at the rate seen, within bounds; slower at once, faster by
steps."""

from __future__ import annotations

from master.intake import ChunkPace


def test_a_small_first_chunk_until_one_was_timed() -> None:
    pace = ChunkPace(0.25, first=100)
    assert pace.size(500) == 100
    assert pace.size(30) == 30
    pace.stored(0, 1.0)  # nothing stored, nothing learnt
    pace.stored(100, 0.0)
    assert pace.rate is None and pace.size(500) == 100


def test_a_slow_store_cuts_the_chunk_to_the_budget_and_fast_ones_restore_it_by_steps() -> None:
    pace = ChunkPace(0.25, growth=1.5)
    pace.stored(500, 1.25)  # 400 devices a second: 0.25 s holds 100
    assert pace.size(500) == 100
    pace.stored(100, 0.25)  # still 400 a second
    assert pace.size(500) == 100
    sizes = []
    for _ in range(6):  # 10,000 a second now: each chunk at most 1.5 times the last
        size = pace.size(500)
        sizes.append(size)
        pace.stored(size, size / 10_000)
    assert sizes == [100, 150, 225, 337, 500, 500]


def test_a_fast_first_chunk_does_not_make_the_second_a_long_one() -> None:
    """Timed on a quiet server, the first chunk says 1,400 devices a second; the
    second is stored while the first's tasks are being sent, five times slower. It
    is at most 1.5 times the first, and the third is cut to what the second's rate
    fits in the budget."""
    pace = ChunkPace(0.25, first=100, growth=1.5)
    pace.stored(pace.size(500), 0.07)  # 1,428 a second
    second = pace.size(500)
    assert second == 150  # not 357, what the rate alone would give
    pace.stored(second, second / 263)  # loaded: 263 a second, 0.57 s
    assert pace.size(500) == 65  # 263 * 0.25: believed at once


def test_never_below_the_floor_nor_above_the_setting() -> None:
    pace = ChunkPace(0.25, floor=50)
    pace.stored(10, 10.0)  # one device a second
    assert pace.size(500) == 50
    assert pace.size(20) == 20  # a setting below the floor stands
    assert ChunkPace(0.0, rate=1.0).size(500) == 500  # no budget: always the setting


def test_a_faster_rate_counts_halfway_and_a_slower_one_at_once() -> None:
    pace = ChunkPace(1.0, growth=100.0)
    pace.stored(200, 1.0)
    pace.stored(400, 1.0)
    assert pace.rate == 300.0 and pace.size(1000) == 300
    pace.stored(100, 1.0)
    assert pace.rate == 100.0 and pace.size(1000) == 100
