"""Coalescer: group commit of concurrent calls made in one loop tick, and lanes."""

from __future__ import annotations

import asyncio

import pytest

from worker.batching import Coalescer, Lane


class Recorder:
    """A run_batch that records its batches and answers item * 10."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"batch with {self.fail_on} failed")
        return [i * 10 for i in items]


async def test_calls_of_one_tick_run_as_one_batch() -> None:
    run = Recorder()
    co: Coalescer[int, int] = Coalescer(run)
    results = await asyncio.gather(*(co(i) for i in range(6)))
    assert run.batches == [[0, 1, 2, 3, 4, 5]]
    assert results == [0, 10, 20, 30, 40, 50]


async def test_caller_arriving_after_the_drainer_started_in_same_tick_joins() -> None:
    run = Recorder()
    co: Coalescer[int, int] = Coalescer(run)
    first = asyncio.create_task(co(1))
    await asyncio.sleep(0)  # first has joined and started the drainer, which has not run
    second = asyncio.create_task(co(2))
    assert await asyncio.gather(first, second) == [10, 20]
    assert run.batches == [[1, 2]]


async def test_results_routed_to_their_callers() -> None:
    async def shout(items: list[str]) -> list[str]:
        return [f"{s}!" for s in items]

    co: Coalescer[str, str] = Coalescer(shout)

    async def call(s: str) -> tuple[str, str]:
        return s, await co(s)

    pairs = await asyncio.gather(*(call(s) for s in ["b", "a", "c", "a2"]))
    assert all(out == f"{inp}!" for inp, out in pairs)


async def test_lone_call_is_not_delayed_beyond_a_tick() -> None:
    run = Recorder()
    co: Coalescer[int, int] = Coalescer(run)
    assert await asyncio.wait_for(co(7), timeout=1.0) == 70
    assert run.batches == [[7]]


async def test_max_batch_splits_in_order() -> None:
    run = Recorder()
    co: Coalescer[int, int] = Coalescer(run, max_batch=2)
    results = await asyncio.gather(*(co(i) for i in range(5)))
    assert run.batches == [[0, 1], [2, 3], [4]]
    assert results == [0, 10, 20, 30, 40]


async def test_calls_during_a_running_batch_form_the_next_batch() -> None:
    run = Recorder()
    gate = asyncio.Event()
    run.gate = gate
    co: Coalescer[int, int] = Coalescer(run)
    first = [asyncio.create_task(co(i)) for i in (1, 2)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert run.batches == [[1, 2]]  # now blocked in run_batch
    second = [asyncio.create_task(co(i)) for i in (3, 4, 5)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert run.batches == [[1, 2]]  # the newcomers wait for the running batch
    gate.set()
    assert await asyncio.gather(*first, *second) == [10, 20, 30, 40, 50]
    assert run.batches == [[1, 2], [3, 4, 5]]


async def test_exception_fails_only_its_own_batch() -> None:
    run = Recorder(fail_on=2)
    gate = asyncio.Event()
    run.gate = gate
    co: Coalescer[int, int] = Coalescer(run)
    first = [asyncio.create_task(co(i)) for i in (1, 2)]
    for _ in range(5):
        await asyncio.sleep(0)
    second = [asyncio.create_task(co(i)) for i in (3, 4)]
    gate.set()
    outcomes = await asyncio.gather(*first, *second, return_exceptions=True)
    assert isinstance(outcomes[0], RuntimeError) and isinstance(outcomes[1], RuntimeError)
    assert outcomes[0] is outcomes[1]
    assert outcomes[2:] == [30, 40]
    assert run.batches == [[1, 2], [3, 4]]


async def test_coalescer_keeps_working_after_a_failed_batch() -> None:
    run = Recorder(fail_on=1)
    co: Coalescer[int, int] = Coalescer(run)
    with pytest.raises(RuntimeError):
        await co(1)
    assert await co(2) == 20


async def test_cancelled_caller_does_not_break_the_batch() -> None:
    run = Recorder()
    co: Coalescer[int, int] = Coalescer(run)
    tasks = [asyncio.create_task(co(i)) for i in (1, 2, 3)]
    await asyncio.sleep(0)  # every caller has joined
    tasks[1].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert done[0] == 10 and done[2] == 30
    assert isinstance(done[1], asyncio.CancelledError)
    assert await co(4) == 40


async def test_wrong_result_count_fails_callers_instead_of_hanging() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    co: Coalescer[int, int] = Coalescer(short)
    calls = [asyncio.create_task(co(i)) for i in (1, 2, 3)]
    _done, pending = await asyncio.wait(calls, timeout=0.5)
    for t in pending:
        t.cancel()
    assert not pending, "callers left hanging"


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class TwoSteps:
    """Two coalescers, on one lane or none; `a`'s first batch (of 1) blocks on `gate`."""

    def __init__(self, lane: Lane | None) -> None:
        self.first, self.second = Recorder(), Recorder()
        self.gate = asyncio.Event()
        self.first.gate = self.gate
        self.a: Coalescer[int, int] = Coalescer(self.first, lane=lane)
        self.b: Coalescer[int, int] = Coalescer(self.second, lane=lane)

    async def hold_a(self) -> asyncio.Task[int]:
        held = asyncio.create_task(self.a(1))
        await settle()
        assert self.first.batches == [[1]]  # blocked in its batch
        return held


async def test_coalescers_sharing_a_lane_run_one_batch_at_a_time() -> None:
    steps = TwoSteps(Lane())
    held = await steps.hold_a()
    waiting = [asyncio.create_task(steps.b(i)) for i in (2, 3)]
    late = asyncio.create_task(steps.a(4))
    await settle()
    assert steps.second.batches == []  # the lane is taken
    steps.gate.set()
    assert await asyncio.gather(held, *waiting, late) == [10, 20, 30, 40]
    assert steps.second.batches == [[2, 3]]
    assert steps.first.batches == [[1], [4]]


async def test_a_batch_is_cut_when_the_lane_frees_so_late_callers_join_it() -> None:
    steps = TwoSteps(Lane())
    held = await steps.hold_a()
    early = asyncio.create_task(steps.b(2))
    await settle()
    later = [asyncio.create_task(steps.b(i)) for i in (3, 4)]  # while b's drainer waits
    await settle()
    steps.gate.set()
    assert await asyncio.gather(held, early, *later) == [10, 20, 30, 40]
    assert steps.second.batches == [[2, 3, 4]]


async def test_without_a_lane_coalescers_run_side_by_side() -> None:
    steps = TwoSteps(None)
    held = await steps.hold_a()
    assert await asyncio.wait_for(steps.b(2), timeout=1.0) == 20  # not behind a's batch
    steps.gate.set()
    assert await held == 10
