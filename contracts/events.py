"""The event envelope every service publishes, and the catalogue of event types.

Events are nameko events: exchange ``<source>.events``, routing key = event type. The body
is the envelope below serialised as JSON (plain strings, no kombu type envelopes), so
non-Python consumers can read it too.
"""
import uuid
from datetime import datetime, timezone

from marshmallow import RAISE, Schema, fields, validate

ENVELOPE_SCHEMA_VERSION = 1


class EventEnvelopeSchema(Schema):
    class Meta:
        unknown = RAISE

    event_id = fields.UUID(required=True)
    event_type = fields.String(required=True, validate=validate.Length(min=1, max=100))
    source = fields.String(required=True, validate=validate.Length(min=1, max=50))
    occurred_at = fields.AwareDateTime(required=True, format="iso")
    schema_version = fields.Integer(required=True, validate=validate.Range(min=1))
    # ids the event is about, e.g. {"ticket_id": "..."}: lets consumers route without the payload
    subject_ids = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    payload = fields.Dict(required=True)


def iso_utc(moment: datetime | None) -> str | None:
    """UTC ISO 8601 with a ``Z`` suffix, the one wire format for time."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def make_envelope(source, event_type, subject_ids, payload, *, schema_version=1,
                  occurred_at=None, event_id=None) -> dict:
    """Build a wire-ready envelope (a plain JSON-able dict)."""
    return {
        "event_id": str(event_id or uuid.uuid4()),
        "event_type": event_type,
        "source": source,
        "occurred_at": iso_utc(occurred_at or datetime.now(timezone.utc)),
        "schema_version": schema_version,
        "subject_ids": {k: str(v) for k, v in subject_ids.items()},
        "payload": payload,
    }
