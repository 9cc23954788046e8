"""How much of a fan-out an intake round stores: a small first chunk, then what the
store does in the budget at the rate seen, within bounds."""

from __future__ import annotations

from master.intake import ChunkPace


def test_a_small_first_chunk_until_one_was_timed() -> None:
    pace = ChunkPace(0.25, first=100)
    assert pace.size(500) == 100
    assert pace.size(30) == 30
    pace.stored(0, 1.0)  # nothing stored, nothing learnt
    pace.stored(100, 0.0)
    assert pace.rate is None and pace.size(500) == 100


def test_a_slow_store_cuts_the_chunk_to_the_budget_and_a_fast_one_restores_it() -> None:
    pace = ChunkPace(0.25)
    pace.stored(500, 1.25)  # 400 devices a second: 0.25 s holds 100
    assert pace.size(500) == 100
    pace.stored(100, 0.25)  # still 400 a second
    assert pace.size(500) == 100
    for _ in range(10):
        pace.stored(100, 0.01)  # 10,000 a second: the setting bounds it
    assert pace.size(500) == 500


def test_never_below_the_floor_nor_above_the_setting() -> None:
    pace = ChunkPace(0.25, floor=50)
    pace.stored(10, 10.0)  # one device a second
    assert pace.size(500) == 50
    assert pace.size(20) == 20  # a setting below the floor stands
    assert ChunkPace(0.0, rate=1.0).size(500) == 500  # no budget: always the setting


def test_the_rate_is_smoothed_over_chunks() -> None:
    pace = ChunkPace(1.0)
    pace.stored(400, 1.0)
    pace.stored(200, 1.0)
    assert pace.rate == 300.0 and pace.size(1000) == 300
