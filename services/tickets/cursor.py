"""Opaque keyset-pagination cursors: the last row's sort value and number, base64url JSON."""
import base64
import binascii
import json

from contracts.errors import ValidationError


def encode(sort: str, value, number: int) -> str:
    raw = json.dumps({"s": sort, "v": value, "n": number}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, sort: str) -> tuple[object, int]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if not isinstance(data, dict) or not isinstance(data.get("n"), int) or "v" not in data:
            raise ValueError("shape")
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("malformed cursor", {"cursor": ["not a cursor this API issued"]})
    if data.get("s") != sort:
        raise ValidationError("cursor belongs to a different sort order",
                              {"cursor": [f"issued for sort={data.get('s')}, not {sort}"]})
    return data["v"], data["n"]
