"""ShareMark: how much a take may bring while other masters are alive (pure), and
WorkSharing's open/closed event."""

from __future__ import annotations

import asyncio

from master.sharing import Load, ShareMark, WorkSharing, share_prefetch
from sendscript.settings import Settings


def load(queued: int, ready: int = 0, free_slots: int = 0) -> Load:
    return Load(queued, ready, free_slots)


def test_alone_a_master_takes_whole_batches() -> None:
    mark = ShareMark(prefetch=8, peers=0)
    assert not mark.sharing
    assert mark.room(load(1000), batch=200) == 200


def test_with_peers_a_take_fills_the_board_to_the_mark_and_no_further() -> None:
    mark = ShareMark(prefetch=8, peers=2)
    assert mark.sharing
    assert mark.room(load(0), batch=200) == 8
    assert mark.room(load(5, ready=5), batch=200) == 3
    assert mark.room(load(5, ready=5), batch=2) == 2
    assert mark.room(load(8, ready=8), batch=200) == 0
    assert mark.room(load(30, ready=30), batch=200) == 0  # a fan-out overshot


def test_at_the_mark_it_takes_again_at_half_of_it() -> None:
    mark = ShareMark(prefetch=8, peers=1)
    assert mark.room(load(8, ready=8), batch=200) == 0
    assert mark.room(load(7, ready=7), batch=200) == 0  # not one task a dispatch
    assert mark.room(load(5, ready=5), batch=200) == 0
    assert mark.room(load(4, ready=4), batch=200) == 4  # half: a batch again
    assert mark.room(load(6, ready=6), batch=200) == 2  # open until the mark


def test_idle_slots_with_nothing_ready_take_past_the_mark() -> None:
    # 300 tasks of a paused queue sit on the board: none can go, the slots are idle.
    mark = ShareMark(prefetch=8, peers=1)
    assert mark.room(load(300, ready=0, free_slots=16), batch=200) == 16
    assert mark.room(load(300, ready=0, free_slots=16), batch=10) == 10
    # A device ready: dispatch fills the slots first.
    assert mark.room(load(300, ready=1, free_slots=16), batch=200) == 0
    # Below the mark, the larger of the two rooms.
    assert mark.room(load(0, ready=0, free_slots=30), batch=200) == 30


def test_prefetch_zero_turns_sharing_off() -> None:
    mark = ShareMark(prefetch=0, peers=3)
    assert not mark.sharing and mark.room(load(10_000), batch=50) == 50


def test_the_default_mark_is_four_times_the_send_slots() -> None:
    assert share_prefetch(Settings(workers=3, worker_concurrency=10)) == 120
    assert share_prefetch(Settings(workers=3, share_prefetch=7)) == 7
    assert share_prefetch(Settings(share_prefetch=0)) == 0


class Board:
    queued = 0
    ready = 0


async def peers() -> int:
    return 1


def sharing_of(board: Board, free_slots: list[int]) -> WorkSharing:
    sharing = WorkSharing(Settings(share_prefetch=4), board, lambda: free_slots[0], peers)
    sharing.mark.peers = 1
    return sharing


async def test_intake_waits_at_the_mark_until_the_board_drains() -> None:
    board, slots = Board(), [0]
    sharing = sharing_of(board, slots)
    stop = asyncio.Event()
    board.queued = board.ready = 4
    waiting = asyncio.ensure_future(sharing.wait_open(stop))
    await asyncio.sleep(0.01)
    assert not waiting.done() and sharing.room(10) == 0
    board.queued = board.ready = 3
    sharing.update()  # what a TaskDispatched makes it do: above half the mark
    await asyncio.sleep(0.01)
    assert not waiting.done()
    board.queued = board.ready = 2
    sharing.update()
    assert await asyncio.wait_for(waiting, 1) is True
    assert sharing.room(10) == 2 and sharing.waits == 1


async def test_slots_freed_with_nothing_ready_open_the_wait() -> None:
    board, slots = Board(), [0]
    sharing = sharing_of(board, slots)
    stop = asyncio.Event()
    board.queued, board.ready = 50, 0  # held tasks: none can go
    waiting = asyncio.ensure_future(sharing.wait_open(stop))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    slots[0] = 5  # answers came back; nothing on the board can use the slots
    sharing.update()
    assert await asyncio.wait_for(waiting, 1) is True
    assert sharing.room(100) == 5


async def test_a_stop_ends_the_wait() -> None:
    board, slots = Board(), [0]
    board.queued = board.ready = 9
    sharing = sharing_of(board, slots)
    stop = asyncio.Event()
    waiting = asyncio.ensure_future(sharing.wait_open(stop))
    await asyncio.sleep(0.01)
    stop.set()
    assert await asyncio.wait_for(waiting, 1) is False
