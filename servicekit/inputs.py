"""What every service's RPC entrypoints do with their arguments first: load them with the
contract's schema, or refuse them with a typed ValidationError (never a crash)."""
from marshmallow import ValidationError as SchemaError

from contracts.errors import ValidationError
from contracts.tickets import ActorSchema
from servicekit.actor import Actor

_actor_schema = ActorSchema()


def load(schema, data) -> dict:
    try:
        return schema.load(data if data is not None else {})
    except SchemaError as exc:
        raise ValidationError("invalid request", exc.normalized_messages())


def actor(data) -> Actor:
    """The caller, as the gateway passed it with the call."""
    return Actor.from_dict(load(_actor_schema, data))


def expected_version(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("expected_version must be a positive integer",
                              {"expected_version": ["positive integer"]})
    return value


def identifier(value, name: str) -> str:
    """An id argument: a string of 1-200 characters (what it names is the service's question)."""
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise ValidationError(f"{name} must be 1-200 characters", {name: ["1-200 characters"]})
    return value
