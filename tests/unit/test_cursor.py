"""Opaque keyset cursors: what we issue decodes back; anything else is a ValidationError (422)."""
import base64
import json

import pytest
from hypothesis import given, strategies as st

from contracts.errors import ValidationError
from services.tickets import cursor
from services.tickets.schemas import SORTS


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor(data) -> str:
    return _b64(json.dumps(data).encode())


def _refused(text: str, sort: str = "-created_at") -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        cursor.decode(text, sort)
    assert set(caught.value.errors) == {"cursor"}
    return caught.value


@pytest.mark.parametrize("sort,value", [
    ("-created_at", "2026-01-05T09:00:00.123456+00:00"),
    ("updated_at", "2026-01-05T09:00:00+00:00"),
    ("priority", 0),
    ("-priority", 3),
    ("number", 1001),
    ("-number", 1234567),
])
def test_issued_cursor_decodes_to_the_same_position(sort, value):
    assert cursor.decode(cursor.encode(sort, value, 1042), sort) == (value, 1042)


@given(st.sampled_from(SORTS), st.one_of(st.integers(0, 10**9), st.text(max_size=40)),
       st.integers(min_value=1, max_value=2**31))
def test_round_trip_for_any_sort_and_position(sort, value, number):
    key = sort.lstrip("-")
    if key in ("priority", "number"):
        value = value if isinstance(value, int) else number
    else:
        value = str(value)
    assert cursor.decode(cursor.encode(sort, value, number), sort) == (value, number)


def test_cursor_is_url_safe_without_padding():
    text = cursor.encode("-created_at", "2026-01-05T09:00:00.999999+00:00", 99999)
    assert "=" not in text and "+" not in text and "/" not in text


@pytest.mark.parametrize("garbage", [
    "not a cursor", "!!!!", "a", "====", "%%%", "\u00e9\u00e9\u00e9\u00e9", "eyJ",
])
def test_garbage_is_a_malformed_cursor(garbage):
    assert _refused(garbage).detail == "malformed cursor"


def test_base64_of_something_that_is_not_json_is_malformed():
    _refused(_b64(b"hello world"))


def test_base64_of_invalid_utf8_is_malformed():
    _refused(_b64(b"\xff\xfe\xfa"))


@pytest.mark.parametrize("data", [[1, 2], "s", 3, None, True])
def test_json_that_is_not_an_object_is_malformed(data):
    _refused(_cursor(data))


@pytest.mark.parametrize("data", [
    {"s": "-created_at", "v": "2026-01-05T09:00:00+00:00"},               # no number
    {"s": "-created_at", "n": 5},                                         # no value
    {"s": "-created_at", "v": "2026-01-05T09:00:00+00:00", "n": "5"},     # number as text
    {"s": "-created_at", "v": "2026-01-05T09:00:00+00:00", "n": 5.5},
    {"s": "-created_at", "v": "2026-01-05T09:00:00+00:00", "n": None},
])
def test_object_of_the_wrong_shape_is_malformed(data):
    _refused(_cursor(data))


@pytest.mark.parametrize("data,sort", [
    ({"s": "-created_at", "v": "2026-01-05T09:00:00+00:00", "n": True}, "-created_at"),
    ({"s": "-number", "v": 1, "n": 10**20}, "-number"),
    ({"s": "-number", "v": 1, "n": -(10**20)}, "-number"),
    ({"s": "priority", "v": 10**20, "n": 1001}, "priority"),
    ({"s": "priority", "v": 1e308 * 10, "n": 1001}, "priority"),  # json.dumps writes Infinity
    ({"s": "priority", "v": "high", "n": 1001}, "priority"),
    ({"s": "-created_at", "v": 17, "n": 1001}, "-created_at"),
    ({"s": "-updated_at", "v": ["x"], "n": 1001}, "-updated_at"),
])
def test_values_a_cursor_never_carries_are_malformed(data, sort):
    # bool/out-of-range numbers once got past decode and failed in the database query
    # (ArgumentError, OverflowError): a 500 instead of a 422
    _refused(_cursor(data), sort)


def test_cursor_of_another_sort_is_refused_and_says_which():
    issued = cursor.encode("-created_at", "2026-01-05T09:00:00+00:00", 1001)
    error = _refused(issued, "priority")
    assert error.detail == "cursor belongs to a different sort order"
    assert error.errors == {"cursor": ["issued for sort=-created_at, not priority"]}


def test_cursor_without_sort_is_refused_for_every_sort():
    text = _cursor({"v": 1, "n": 1001})
    for sort in SORTS:
        _refused(text, sort)


@given(st.text(max_size=80))
def test_decode_never_fails_with_anything_but_a_validation_error(text):
    try:
        cursor.decode(text, "-created_at")
    except ValidationError as exc:
        assert set(exc.errors) == {"cursor"}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8)
CURSOR_LIKE = st.fixed_dictionaries({"s": st.sampled_from(SORTS), "v": JSON, "n": JSON})


@given(JSON | CURSOR_LIKE, st.sampled_from(SORTS))
def test_decode_of_any_json_fails_only_with_a_validation_error_or_gives_a_safe_position(data, sort):
    try:
        value, number = cursor.decode(_cursor(data), sort)
    except ValidationError:
        return
    assert type(number) is int and -2**63 <= number < 2**63
    if sort.lstrip("-") in ("priority", "number"):
        assert type(value) is int and -2**63 <= value < 2**63
    else:
        assert isinstance(value, str)
