"""Request plumbing of the gateway: JSON bodies with limits, validation, ETags, responses."""
import json

from marshmallow import Schema, ValidationError as SchemaError
from werkzeug.wrappers import Request, Response

from gateway.problems import ApiProblem

JSON_TYPES = ("application/json", "application/merge-patch+json")


def json_response(payload, status: int = 200, headers: dict | None = None) -> Response:
    response = Response(json.dumps(payload), status=status, content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def read_json_body(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, or a 4xx: 413 too large, 415 not JSON, 400 malformed."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiProblem(413, f"request body exceeds {max_bytes} bytes")
    mimetype = (request.mimetype or "").lower()
    if mimetype not in JSON_TYPES:
        raise ApiProblem(415, "send the body as application/json",
                         errors={"content-type": [f"got {mimetype or 'nothing'}"]})
    stream = request.stream
    if request.content_length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        # werkzeug hands out an empty stream when there is no Content-Length (the server does not
        # say it terminates the input); eventlet decodes chunked input itself, so read it directly
        stream = request.environ["wsgi.input"]
    raw = stream.read(max_bytes + 1)  # bounded even without Content-Length (chunked)
    if len(raw) > max_bytes:
        raise ApiProblem(413, f"request body exceeds {max_bytes} bytes")
    if not raw.strip():
        raise ApiProblem(400, "the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
        raise ApiProblem(400, f"malformed JSON: {str(exc)[:200]}", code="malformed_json")
    if not isinstance(body, dict):
        raise ApiProblem(400, "the request body must be a JSON object", code="malformed_json")
    return body


def validate(schema: Schema, data: dict, status: int = 422) -> dict:
    try:
        return schema.load(data)
    except SchemaError as exc:
        raise ApiProblem(status, "the request has invalid or unknown fields",
                         code="validation_error", errors=exc.normalized_messages())


def etag_for(version: int) -> str:
    return f'"{version}"'


def expected_version(request: Request, required: bool = True) -> int | None:
    """The version an ``If-Match`` names; ``*`` means any. Missing: 428 (no blind overwrites),
    or any version (None) where the route makes the header optional."""
    header = request.headers.get("If-Match")
    if header is None:
        if not required:
            return None
        raise ApiProblem(428, "send If-Match with the ETag you last read, so you don't overwrite "
                              "someone else's change", code="precondition_required")
    if header.strip() == "*":
        return None
    versions = []
    for tag in header.split(","):
        tag = tag.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        tag = tag.strip('"')
        if tag.isascii() and tag.isdigit():  # "²".isdigit() is true, int("²") is not
            versions.append(int(tag))
    if len(versions) != 1:
        raise ApiProblem(412, "If-Match must carry exactly one ETag this API issued",
                         code="precondition_failed", errors={"if-match": [header[:100]]})
    return versions[0]


def not_modified(request: Request, version: int) -> bool:
    header = request.headers.get("If-None-Match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return "*" in tags or etag_for(version) in tags
