"""ShareMark: how much a take may bring while other masters are alive (pure)."""

from __future__ import annotations

import asyncio

from master.sharing import ShareMark, WorkSharing, share_prefetch
from sendscript.settings import Settings


def test_alone_a_master_takes_whole_batches() -> None:
    mark = ShareMark(prefetch=8, peers=0)
    assert not mark.sharing
    assert mark.room(queued=1000, batch=200) == 200


def test_with_peers_a_take_fills_the_board_to_the_mark_and_no_further() -> None:
    mark = ShareMark(prefetch=8, peers=2)
    assert mark.sharing
    assert mark.room(queued=0, batch=200) == 8
    assert mark.room(queued=5, batch=200) == 3
    assert mark.room(queued=5, batch=2) == 2
    assert mark.room(queued=8, batch=200) == 0
    assert mark.room(queued=30, batch=200) == 0  # a fan-out overshot: nothing more


def test_prefetch_zero_turns_sharing_off() -> None:
    mark = ShareMark(prefetch=0, peers=3)
    assert not mark.sharing and mark.room(queued=10_000, batch=50) == 50


def test_the_default_mark_is_four_times_the_send_slots() -> None:
    assert share_prefetch(Settings(workers=3, worker_concurrency=10)) == 120
    assert share_prefetch(Settings(workers=3, share_prefetch=7)) == 7
    assert share_prefetch(Settings(share_prefetch=0)) == 0


class Board:
    queued = 0


async def test_intake_waits_at_the_mark_until_the_board_drains() -> None:
    board = Board()

    async def peers() -> int:
        return 1

    sharing = WorkSharing(Settings(share_prefetch=4), board, peers)
    sharing.mark.peers = 1
    stop = asyncio.Event()
    board.queued = 4
    waiting = asyncio.ensure_future(sharing.wait_open(stop))
    await asyncio.sleep(0.01)
    assert not waiting.done() and sharing.room(10) == 0
    board.queued = 1
    sharing.update()  # what a TaskDispatched makes it do
    assert await asyncio.wait_for(waiting, 1) is True
    assert sharing.room(10) == 3 and sharing.waits == 1


async def test_a_stop_ends_the_wait() -> None:
    board = Board()
    board.queued = 9

    async def peers() -> int:
        return 1

    sharing = WorkSharing(Settings(share_prefetch=4), board, peers)
    sharing.mark.peers = 1
    stop = asyncio.Event()
    waiting = asyncio.ensure_future(sharing.wait_open(stop))
    await asyncio.sleep(0.01)
    stop.set()
    assert await asyncio.wait_for(waiting, 1) is False
