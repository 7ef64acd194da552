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
    """Guarantees every worker a request id (kept in nameko context data, so RPC calls and
    events it makes carry it) and makes it current for logging."""

    def incoming_request_id(self, worker_ctx) -> str | None:
        return worker_ctx.data.get(REQUEST_ID_KEY)

    def _ensure(self, worker_ctx) -> str:
        # nameko injects dependencies before worker_setup runs; whichever comes first decides
        request_id = worker_ctx.data.get(REQUEST_ID_KEY)
        if not request_id:
            request_id = accept_request_id(self.incoming_request_id(worker_ctx))
            worker_ctx.data[REQUEST_ID_KEY] = request_id
        return request_id

    def get_dependency(self, worker_ctx):
        return self._ensure(worker_ctx)

    def worker_setup(self, worker_ctx):
        set_current_request_id(self._ensure(worker_ctx))

    def worker_teardown(self, worker_ctx):
        set_current_request_id(None)
