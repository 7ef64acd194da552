"""Typed errors shared by RPC callers and services.

Registered with nameko's ``deserialize_to_instance`` so that an error raised inside a
service arrives at the caller as the same class (not a generic ``RemoteError``), with the
same ``detail`` and per-field ``errors``. The gateway maps each class to an HTTP status.
"""
from nameko.exceptions import deserialize_to_instance


class HelpdeskError(Exception):
    """Base class; ``code`` is a stable machine-readable name, ``status`` the HTTP mapping."""

    code = "error"
    status = 500
    title = "Internal error"

    def __init__(self, detail="", errors=None):
        # args must stay JSON-serialisable: nameko rebuilds the instance from them, and it
        # stringifies anything that is not a str, dict or list (None would arrive as "None")
        errors = errors if isinstance(errors, dict) else {}
        super().__init__(detail, errors)
        self.detail = detail
        self.errors = errors

    def __str__(self):
        return self.detail or self.title


@deserialize_to_instance
class ValidationError(HelpdeskError):
    code = "validation_error"
    status = 422
    title = "Invalid request"


@deserialize_to_instance
class NotFound(HelpdeskError):
    code = "not_found"
    status = 404
    title = "Not found"


@deserialize_to_instance
class Forbidden(HelpdeskError):
    code = "forbidden"
    status = 403
    title = "Forbidden"


@deserialize_to_instance
class Conflict(HelpdeskError):
    code = "conflict"
    status = 409
    title = "Conflict"


@deserialize_to_instance
class InvalidTransition(Conflict):
    code = "invalid_transition"
    title = "Invalid status transition"


@deserialize_to_instance
class PreconditionFailed(HelpdeskError):
    """The caller's expected version (HTTP If-Match) is stale."""

    code = "precondition_failed"
    status = 412
    title = "Precondition failed"


TYPED_ERRORS = (ValidationError, NotFound, Forbidden, Conflict, InvalidTransition, PreconditionFailed)
_BY_CODE = {cls.code: cls for cls in TYPED_ERRORS}


def error_payload(exc: HelpdeskError) -> dict:
    """A typed error as data, for an answer that carries one error per item of a batch."""
    return {"code": exc.code, "detail": exc.detail, "errors": exc.errors}


# an item of a batch that failed for a reason other than a typed refusal (its transaction rolled
# back): the caller may try it again later
UNAVAILABLE = "unavailable"


def error_from_payload(payload) -> HelpdeskError | None:
    """The typed error ``error_payload`` described; None when it is not a typed refusal (the
    ``unavailable`` code, a code this side does not know, a malformed payload): not final."""
    cls = _BY_CODE.get(payload.get("code")) if isinstance(payload, dict) else None
    return cls(payload.get("detail", ""), payload.get("errors")) if cls else None
