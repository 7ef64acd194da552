"""Request ids: created (or taken from X-Request-ID) by the gateway, carried through every RPC
call and event as nameko context data (header ``nameko.request_id``), and put on every log line.
"""
import re
import threading
import uuid

from nameko.extensions import DependencyProvider

REQUEST_ID_KEY = "request_id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# green-thread local once eventlet has monkey-patched threading (every process entry does)
_local = threading.local()


def current_request_id() -> str | None:
    return getattr(_local, "request_id", None)


def set_current_request_id(value: str | None) -> None:
    _local.request_id = value


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(candidate: str | None) -> str:
    """Keep a caller's id if it is sane (bounded, printable), else mint one."""
    if candidate and _VALID_REQUEST_ID.match(candidate):
        return candidate
    return new_request_id()


class RequestContext(DependencyProvider):
    """Makes the worker's request id current for logging and guarantees one exists."""

    def worker_setup(self, worker_ctx):
        request_id = worker_ctx.data.get(REQUEST_ID_KEY)
        if not request_id:
            request_id = new_request_id()
            worker_ctx.data[REQUEST_ID_KEY] = request_id
        set_current_request_id(request_id)

    def worker_teardown(self, worker_ctx):
        set_current_request_id(None)

    def get_dependency(self, worker_ctx):
        return worker_ctx.data.get(REQUEST_ID_KEY)
