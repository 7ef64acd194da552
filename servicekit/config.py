"""Settings from the environment, read once per process, with defaults that run the embedded stack.

Variables are ``HELPDESK_<SERVICE>_<SETTING>`` plus the shared ``AMQP_URI``.
"""
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_AMQP_URI = "amqp://guest:guest@localhost:5672/"

# Default per-service HTTP ports for /metrics and probes (the gateway owns 8000).
DEFAULT_HTTP_PORTS = {"gateway": 8000, "tickets": 9101, "routing": 9102}


def env(service: str, setting: str, default=None):
    return os.environ.get(f"HELPDESK_{service.upper()}_{setting.upper()}", default)


def var_dir() -> Path:
    path = Path(os.environ.get("HELPDESK_VAR_DIR", REPO_ROOT / "var"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class ServiceSettings:
    service: str
    amqp_uri: str
    database_url: str
    http_host: str
    http_port: int
    max_workers: int
    log_level: str
    # an RPC to another service gives up after this long (nameko's RpcProxy has no timeout)
    rpc_timeout_seconds: float
    # handled-event retries before a message is parked in the dead-letter queue
    event_max_attempts: int
    event_retry_base_seconds: float
    # the outbox relay's own broker connection (None: AMQP_URI); lets a publisher-side outage
    # be tested without taking RPC down too
    outbox_amqp_uri: str | None = None

    @classmethod
    def load(cls, service: str) -> "ServiceSettings":
        return cls(
            service=service,
            amqp_uri=os.environ.get("AMQP_URI", DEFAULT_AMQP_URI),
            database_url=env(service, "DATABASE_URL", f"sqlite:///{var_dir() / (service + '.db')}"),
            http_host=env(service, "HTTP_HOST", "0.0.0.0"),
            http_port=int(env(service, "HTTP_PORT", DEFAULT_HTTP_PORTS.get(service, 9100))),
            max_workers=int(env(service, "MAX_WORKERS", 10)),
            log_level=env(service, "LOG_LEVEL", os.environ.get("HELPDESK_LOG_LEVEL", "INFO")),
            rpc_timeout_seconds=float(env(service, "RPC_TIMEOUT_SECONDS", 10)),
            event_max_attempts=int(env(service, "EVENT_MAX_ATTEMPTS", 5)),
            event_retry_base_seconds=float(env(service, "EVENT_RETRY_BASE_SECONDS", 0.2)),
            outbox_amqp_uri=env(service, "OUTBOX_AMQP_URI"),
        )

    def nameko_config(self) -> dict:
        return {
            "AMQP_URI": self.amqp_uri,
            "WEB_SERVER_ADDRESS": f"{self.http_host}:{self.http_port}",
            "max_workers": self.max_workers,
            "parent_calls_tracked": 10,
            "serializer": "json",
            # our own settings ride along so dependency providers read one object
            "HELPDESK_SETTINGS": self,
        }


def settings_from_container(container) -> ServiceSettings:
    settings = container.config.get("HELPDESK_SETTINGS")
    if settings is None:  # tests that build a config by hand
        settings = ServiceSettings.load(container.service_name)
    return settings
