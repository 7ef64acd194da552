"""RFC 9457 problem details: every error the API returns is ``application/problem+json``."""
import json

from werkzeug.wrappers import Response

from contracts.errors import HelpdeskError

PROBLEM_TYPE_BASE = "urn:helpdesk:problem:"  # stable identifiers, nothing to fetch
PROBLEM_CONTENT_TYPE = "application/problem+json"

TITLES = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found",
    405: "Method not allowed", 406: "Not acceptable", 409: "Conflict", 412: "Precondition failed",
    413: "Payload too large", 415: "Unsupported media type", 422: "Invalid request",
    428: "Precondition required", 429: "Too many requests", 500: "Internal error",
    503: "Service unavailable", 504: "Gateway timeout",
}


class ApiProblem(Exception):
    """Raised anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, detail: str, code: str | None = None, errors: dict | None = None,
                 headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.code = code or TITLES.get(status, "error").lower().replace(" ", "_")
        self.errors = errors
        self.headers = headers or {}


def problem_response(status: int, detail: str, code: str, request_id: str | None,
                     errors: dict | None = None, headers: dict | None = None,
                     title: str | None = None) -> Response:
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title or TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = errors
    if request_id:
        body["request_id"] = request_id
    response = Response(json.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def from_api_problem(problem: ApiProblem, request_id: str | None) -> Response:
    return problem_response(problem.status, problem.detail, problem.code, request_id,
                            problem.errors, problem.headers)


def from_domain_error(error: HelpdeskError, request_id: str | None) -> Response:
    return problem_response(error.status, error.detail or error.title, error.code, request_id,
                            error.errors, title=error.title)
