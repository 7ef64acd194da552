"""JSON logs: one object per line with service, level, logger, message and request id."""
import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from servicekit.context import current_request_id


class _ContextFilter(logging.Filter):
    def __init__(self, service):
        super().__init__()
        self.service = service

    def filter(self, record):
        record.service = self.service
        record.request_id = current_request_id()
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_ContextFilter(service))
    handler.setFormatter(JsonFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s %(service)s %(request_id)s",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kombu/amqp debug chatter is not operator information
    for noisy in ("amqp", "kombu", "nameko.messaging", "nameko.containers"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
