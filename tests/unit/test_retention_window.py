"""The retention sweep's window over an expiry field (master/retention.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from master.retention import BATCH, EARLIEST, OVERLAP, PurgeWindow

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def sweep(window: PurgeWindow, due: list[datetime], cutoff: datetime) -> int:
    """Run one sweep over `due` (the values stored); answer the reads it took."""
    reads = 0
    while (w := window.next(cutoff)) is not None:
        reads += 1
        found = [v for v in due if w[0] <= v < w[1]][:BATCH]
        for v in found:
            due.remove(v)
        window.read(w, len(found), cutoff)
        assert reads < 10_000
    return reads


def test_a_first_sweep_crosses_the_empty_years_in_few_reads() -> None:
    window = PurgeWindow()
    assert sweep(window, [], NOW) < 25
    assert window.floor == NOW - OVERLAP  # the recent past is read again next time


def test_everything_due_is_deleted_and_nothing_else() -> None:
    due = [NOW - timedelta(days=d, seconds=s) for d in (0, 1, 30, 400) for s in range(1, 50)]
    later = [NOW + timedelta(seconds=s) for s in range(5)]
    values = due + later
    sweep(PurgeWindow(), values, NOW)
    assert values == later


def test_a_full_read_narrows_the_window_and_reads_it_again() -> None:
    same = [NOW - timedelta(hours=2)] * (BATCH * 3 + 7)  # finished in one batch
    window = PurgeWindow()
    sweep(window, same, NOW)
    assert same == []


def test_a_dense_range_keeps_reads_near_the_batch() -> None:
    dense = [NOW - timedelta(minutes=30, milliseconds=i) for i in range(20 * BATCH)]
    reads = sweep(PurgeWindow(floor=NOW - timedelta(hours=1)), dense, NOW)
    assert dense == []
    assert reads < 80


def test_the_next_sweep_starts_at_the_floor_not_the_beginning() -> None:
    window = PurgeWindow()
    sweep(window, [], NOW)
    later = NOW + timedelta(minutes=5)
    first = window.next(later)
    assert first is not None and first[0] == NOW - OVERLAP
    assert window.floor > EARLIEST


def test_a_sweep_with_nothing_to_read_says_done() -> None:
    window = PurgeWindow(floor=NOW)
    assert window.next(NOW) is None


def test_years_of_empty_sweeps_keep_the_width_bounded() -> None:
    window = PurgeWindow()
    for day in range(200):
        sweep(window, [], NOW + timedelta(days=day))
    assert window.width <= timedelta(days=3650)
