"""Gateway settings (``HELPDESK_GATEWAY_*``), read once at start."""
import os
from dataclasses import dataclass

from gateway.auth import AuthSettings


def _env(name, default):
    return os.environ.get(f"HELPDESK_GATEWAY_{name}", default)


# nameko's RpcProxy has no timeout; requests also expire in the queue so a call we gave up on
# does not run minutes later when tickets comes back
RPC_TIMEOUT_SECONDS = float(_env("RPC_TIMEOUT_SECONDS", 10))


@dataclass(frozen=True)
class GatewaySettings:
    auth: AuthSettings
    max_body_bytes: int
    rate_limit_per_second: float
    rate_limit_burst: int
    rpc_timeout_seconds: float
    public_base_url: str

    @classmethod
    def load(cls) -> "GatewaySettings":
        port = int(_env("HTTP_PORT", 8000))
        return cls(
            auth=AuthSettings.load(),
            max_body_bytes=int(_env("MAX_BODY_BYTES", 1024 * 1024)),
            rate_limit_per_second=float(_env("RATE_LIMIT_PER_SECOND", 20)),
            rate_limit_burst=int(_env("RATE_LIMIT_BURST", 100)),
            rpc_timeout_seconds=RPC_TIMEOUT_SECONDS,
            public_base_url=_env("PUBLIC_BASE_URL", f"http://localhost:{port}"),
        )
