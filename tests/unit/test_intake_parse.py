"""parse_item: a Redis queue item as a task spec, a task reference, or a clear refusal."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from master.intake import parse_item
from sendscript.models import FanoutSpec, TaskRef, TaskSpec


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_full_spec() -> None:
    item = parse_item(raw({"device_id": "d1", "script": {"id": "s", "args": {"a": 1}},
                           "priority": 8, "run_at": "2024-05-01T12:00:00Z",
                           "dedupe_key": "k", "max_retries": 0, "timeout_s": 30,
                           "queue": "vip"}))
    assert isinstance(item, TaskSpec)
    assert item.device_id == "d1" and item.script == {"id": "s", "args": {"a": 1}}
    assert (item.priority, item.max_retries, item.timeout_s, item.queue) == (8, 0, 30.0, "vip")
    assert item.run_at == datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_task_reference() -> None:
    item = parse_item(raw({"task_id": "abc"}))
    assert isinstance(item, TaskRef)
    assert item.task_id == "abc"


def test_spec_with_task_id_is_a_spec() -> None:
    item = parse_item(raw({"task_id": "abc", "device_id": "d", "script": {}}))
    assert isinstance(item, TaskSpec)


def test_fanout_by_device_list() -> None:
    item = parse_item(raw({"device_ids": ["a", "b"], "script": {"id": "s"}, "priority": 9}))
    assert isinstance(item, FanoutSpec)
    assert item.device_ids == ["a", "b"] and item.group is None and item.priority == 9


def test_fanout_by_group() -> None:
    item = parse_item(raw({"group": "lab-1", "script": {}}))
    assert isinstance(item, FanoutSpec) and item.group == "lab-1"


def test_device_id_wins_over_fanout_fields() -> None:
    assert isinstance(parse_item(raw({"device_id": "d", "device_ids": ["a"], "script": {}})),
                      TaskSpec)


@pytest.mark.parametrize(
    ("obj", "words"),
    [
        ({"device_ids": ["a"], "group": "g", "script": {}}, "exactly one of device_ids or group"),
        ({"device_ids": [], "script": {}}, "device_ids:"),
        ({"device_ids": ["a", " "], "script": {}}, "non-empty strings"),
        ({"device_ids": ["a", 5], "script": {}}, "device_ids.1:"),
        ({"device_ids": ["a"]}, "script: Field required"),
    ],
)
def test_fanout_refusals(obj: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_item(raw(obj))
    assert words in str(info.value)


def test_utf8_bytes_accepted() -> None:
    item = parse_item(json.dumps({"device_id": "手机-1", "script": {}},
                                 ensure_ascii=False).encode())
    assert isinstance(item, TaskSpec) and item.device_id == "手机-1"


@pytest.mark.parametrize("data", [b"", b"{", b"device_id=d1", b"\xff\xfe\x00"])
def test_not_json(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^not JSON"):
        parse_item(data)


@pytest.mark.parametrize(
    ("data", "kind"), [(b"[]", "list"), (b'"x"', "str"), (b"5", "int"), (b"null", "NoneType")]
)
def test_not_an_object(data: bytes, kind: str) -> None:
    with pytest.raises(ValueError, match=f"expected a JSON object, got {kind}"):
        parse_item(data)


def test_empty_object_names_missing_fields() -> None:
    with pytest.raises(ValueError) as info:
        parse_item(b"{}")
    assert "device_id: Field required" in str(info.value)
    assert "script: Field required" in str(info.value)


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"device_id": "d", "script": {}, "priority": 11}, "priority"),
        ({"device_id": "d", "script": {}, "run_at": "next week"}, "run_at"),
        ({"device_id": 5, "script": {}}, "device_id"),
        ({"device_id": "d", "script": "x"}, "script"),
        ({"task_id": ""}, "task_id"),
        ({"task_id": 5}, "task_id"),
    ],
)
def test_invalid_fields_named_in_reason(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_item(raw(obj))
    assert str(info.value).startswith(f"{field}:")


def test_reason_is_not_a_pydantic_error() -> None:
    # The intake catches ValueError; a ValidationError is one too, but the text must be short.
    with pytest.raises(ValueError) as info:
        parse_item(raw({"device_id": "d", "script": {}, "priority": -1}))
    assert type(info.value) is ValueError
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data", [b'{"device_id": "d", "script": {}, "run_at": 1e20}',
                                  b'{"device_id": "d", "script": {}, "run_at": Infinity}',
                                  b'{"device_id": "d", "script": {}, "expire_at": "1e300"}'])
def test_out_of_range_epoch_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^(run_at|expire_at):"):
        parse_item(data)


# -- storable scripts ---------------------------------------------------------------------
def test_a_script_over_the_limit_is_refused_with_its_size() -> None:
    item = raw({"device_id": "d1", "script": {"blob": "x" * 2000}})
    assert isinstance(parse_item(item), TaskSpec)  # no limit given
    with pytest.raises(ValueError, match=r"script: script is 2\d\d\d bytes as BSON, over the "
                                         r"limit of 1024 bytes \(SENDSCRIPT_MAX_SCRIPT_BYTES\)"):
        parse_item(item, max_script_bytes=1024)


def test_a_fanout_script_over_the_limit_is_refused() -> None:
    item = raw({"device_ids": ["a", "b"], "script": {"blob": "x" * 2000}})
    with pytest.raises(ValueError, match="over the limit of 1024 bytes"):
        parse_item(item, max_script_bytes=1024)


@pytest.mark.parametrize(("data", "words"), [
    (b'{"device_id": "d1", "script": {"n": 123456789012345678901234567890}}', "8-byte ints"),
    (b'{"device_id": "d1", "script": {"s": "\\ud800"}}', "surrogates not allowed"),
    (b'{"device_id": "d1", "script": {"\\udfff": 1}}', "unicode string"),  # pydantic's check
    (b'{"device_id": "d1", "script": {"a\\u0000b": 1}}', "NULL byte"),
])
def test_a_script_bson_cannot_hold_is_refused_at_parse(data: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_item(data, max_script_bytes=1024 * 1024)


@pytest.mark.parametrize(("item", "reason"), [
    ({"debounce_s": 5}, "debounce_s: only with a dedupe_key"),
    ({"dedupe_key": "k", "debounce_s": 5, "run_at": 1.7e9}, "give no run_at"),
    ({"dedupe_key": "k", "dedupe_mode": "forever"}, "dedupe_mode: Input should be"),
])
def test_a_bad_dedupe_combination_is_quarantined_with_the_reason(
    item: dict[str, Any], reason: str
) -> None:
    raw = json.dumps({"device_id": "d", "script": {"id": "s"}, **item}).encode()
    with pytest.raises(ValueError, match=reason):
        parse_item(raw)


def test_a_fanout_with_a_device_id_no_task_takes_is_refused_whole() -> None:
    """Caught when the item is parsed (quarantined), not when its chunk is carved."""
    item = {"device_ids": ["ok-1", "x" * 201], "script": {"id": "s"}}
    with pytest.raises(ValueError, match=r"device_ids\.1"):
        parse_item(json.dumps(item).encode())
    parse_item(json.dumps({"device_ids": ["ok-1", "x" * 200], "script": {"id": "s"}}).encode())
