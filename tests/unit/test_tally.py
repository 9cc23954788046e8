"""The benchmarks' read-back tally, pure: what became of each submitted task."""

from __future__ import annotations

from sendscript.dev.tally import Tally, count, field_of


def test_every_task_terminal_is_ok() -> None:
    t = count(range(4), [(0, "success"), (1, "success"), (2, "failed"), (3, "expired")])
    assert t.ok and t.terminal == 4 and t.statuses == {"success": 2, "failed": 1,
                                                       "expired": 1}
    assert t.line() == ("read back from Mongo: 4 of 4 submitted task(s) terminal "
                        "(expired=1 failed=1 success=2); lost 0, unfinished 0, duplicates 0")


def test_a_task_never_stored_is_lost() -> None:
    t = count(["a", "b", "c"], [("a", "success"), ("c", "success")])
    assert not t.ok and t.lost == 1 and t.terminal == 2


def test_a_stored_task_not_terminal_is_unfinished() -> None:
    t = count(range(3), [(0, "success"), (1, "pending"), (2, "sent")])
    assert not t.ok and t.unfinished == 2 and t.lost == 0


def test_a_key_stored_twice_is_a_duplicate_counted_once() -> None:
    t = count(range(2), [(0, "success"), (0, "success"), (1, "success")])
    assert not t.ok and t.duplicates == 1 and t.terminal == 2 and t.lost == 0


def test_documents_of_other_runs_are_not_counted() -> None:
    t = count(range(2), [(0, "success"), (1, "success"), (7, "pending"), (None, "running")])
    assert t.ok and t.submitted == 2 and t.statuses == {"success": 2}


def test_items_still_listed_in_redis_are_accounted_not_lost() -> None:
    t = count(range(5), [(0, "success"), (1, "pending")], listed=[2, 3, "ref"])
    assert t.listed == 2 and t.lost == 1 and not t.accounted
    assert t.line() == ("read back from Mongo and Redis: 2 of 5 submitted item(s) stored "
                        "(pending=1 success=1; 1 terminal), 2 still listed in Redis; lost 1, "
                        "duplicates 0")
    t = count(range(3), [(0, "success"), (1, "pending")], listed=[2])
    assert t.accounted and not t.ok  # the pending one is stored, not finished


def test_an_item_both_stored_and_listed_is_a_duplicate() -> None:
    t = count(range(2), [(0, "success"), (1, "pending")], listed=[1])
    assert t.duplicates == 1 and t.listed == 0 and not t.accounted


def test_the_tally_survives_its_json_form() -> None:
    t = count(range(3), [(0, "success")], listed=[1])
    assert Tally.from_dict(t.as_dict()).line() == t.line()


def test_a_dotted_field_of_a_spec() -> None:
    assert field_of({"script": {"args": {"n": 3}}}, "script.args.n") == 3
    assert field_of({"task_id": "t"}, "script.args.n") is None
