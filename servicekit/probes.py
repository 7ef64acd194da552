"""Probes every service exposes in the same way: a health RPC, and on its own HTTP port
``/metrics``, ``/livez`` and ``/readyz``.

A service class inherits ``ServiceProbes`` and declares ``self_rpc = RpcProxy(<its own name>)``
and ``db = Database()``; nameko finds the inherited entrypoints like its own.
"""
import json

import eventlet
from nameko.web.handlers import http
from sqlalchemy import text

from servicekit.entrypoints import rpc
from servicekit.metrics import metrics_response


class ServiceProbes:
    @rpc
    def health_ping(self):
        return "pong"

    @http("GET", "/metrics")
    def metrics_endpoint(self, request):
        return metrics_response()

    @http("GET", "/livez")
    def livez(self, request):
        return 200, json.dumps({"status": "alive"})

    @http("GET", "/readyz")
    def readyz(self, request):
        """Ready: this service answers its RPC queue through the broker and reaches its database."""
        try:
            with eventlet.Timeout(2):
                self.self_rpc.health_ping()
            with self.db.read() as session:
                session.execute(text("SELECT 1"))
        except (eventlet.Timeout, Exception) as exc:  # Timeout is a BaseException
            return 503, json.dumps({"status": "unavailable", "reason": type(exc).__name__})
        return 200, json.dumps({"status": "ready"})
