"""The task search's cursor: any text that is not one the search gave is a SearchError
(the API's 422), never another exception (a 500)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from console.search import SearchError, decode_cursor, encode_cursor


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode()


def test_a_cursor_round_trips() -> None:
    at = datetime(2026, 5, 1, 10, 0, 0, 123000, tzinfo=UTC)
    assert decode_cursor(encode_cursor({"created_at": at, "_id": "t-1"})) == (at, "t-1")


@pytest.mark.parametrize("raw", ['["inf", "x"]', '["-inf", "x"]', '["nan", "x"]',
                                 '[1e300, "x"]', '[-1e20, "x"]', '[1e18, "x"]', "5",
                                 '{"a": 1}', '[1, 2, 3]', "null", '[[], "x"]', "not json"])
def test_a_cursor_this_search_did_not_give_is_a_search_error(raw: str) -> None:
    with pytest.raises(SearchError, match="not a cursor"):
        decode_cursor(b64(raw))
