"""Opaque keyset-pagination cursors: the last row's sort value and number, base64url JSON."""
import base64
import binascii
import json

from contracts.errors import ValidationError


def encode(sort: str, value, number: int) -> str:
    raw = json.dumps({"s": sort, "v": value, "n": number}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_INT64 = range(-2**63, 2**63)


def _is_int64(value) -> bool:
    # bool is an int to Python but not to SQL; a huge int overflows the database driver
    return type(value) is int and value in _INT64


def _value_fits(sort: str, value) -> bool:
    if sort.lstrip("-") in ("created_at", "updated_at"):
        return isinstance(value, str)
    return _is_int64(value)


def decode(cursor: str, sort: str) -> tuple[object, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(data, dict) or not _is_int64(data.get("n")) or "v" not in data:
            raise ValueError("shape")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("malformed cursor", {"cursor": ["not a cursor this API issued"]})
    if data.get("s") != sort:
        raise ValidationError("cursor belongs to a different sort order",
                              {"cursor": [f"issued for sort={data.get('s')}, not {sort}"]})
    if not _value_fits(sort, data["v"]):
        raise ValidationError("malformed cursor", {"cursor": ["not a cursor this API issued"]})
    return data["v"], data["n"]
