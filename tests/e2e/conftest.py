"""End-to-end fixtures: the real processes (migrate, tickets, routing, gateway) on a throwaway RabbitMQ
vhost and a SQLite database in a temporary directory, driven over HTTP with ``requests``.

One stack per test module (``stack``); every module's tests are marked ``e2e``. The tickets
process publishes its events through a TCP proxy the tests control (``stack.proxy``), so a
broker outage can be simulated for the outbox relay alone while RPC keeps working.
"""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from gateway.auth import mint_token
from tests.support.amqp import AmqpClient
from tests.support.broker import BROKER_HOST, BROKER_PORT, VhostAdmin, amqp_uri
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.tcp_proxy import TcpProxyProcess

REPO_ROOT = Path(__file__).resolve().parents[2]

START_DEADLINE_SECONDS = 45
# the stack's gateway is generous (tests fire requests back to back); the rate-limit test
# starts a second gateway with a tight limit (``Stack.start_extra_gateway``)
RATE_LIMIT_PER_SECOND = 1000
RATE_LIMIT_BURST = 1000
MAX_BODY_BYTES = 64 * 1024


# --- small helpers ---------------------------------------------------------------------------

def wait_until(predicate, timeout: float, interval: float = 0.1, message: str = "condition"):
    """``wait_for`` with this suite's defaults: a timeout always given, a 0.1 s poll."""
    return wait_for(predicate, timeout=timeout, interval=interval, message=message)


PROBLEM_TYPE_PREFIX = "urn:helpdesk:problem:"


def assert_problem(response: requests.Response, status: int, *fields: str) -> dict:
    """A problem+json answer with ``status``; ``fields`` must each be named in ``errors``."""
    assert response.status_code == status, f"{response.status_code} {response.text[:500]}"
    assert response.headers.get("Content-Type", "").startswith("application/problem+json"), \
        response.headers.get("Content-Type")
    body = response.json()
    assert body["status"] == status
    assert isinstance(body["type"], str) and body["type"].startswith(PROBLEM_TYPE_PREFIX), body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["detail"], str) and body["detail"], body
    assert body.get("request_id") == response.headers.get("X-Request-ID"), body
    if fields:
        assert isinstance(body.get("errors"), dict), body
        for field in fields:
            assert field in body["errors"], f"{field} not in {body['errors']}"
    return body


# --- processes -------------------------------------------------------------------------------

class ServiceProcess:
    """One ``python -m servicekit.run <name>`` child with its output in a log file."""

    def __init__(self, name: str, env: dict, log_path: Path):
        self.name, self.env, self.log_path = name, env, log_path
        self.process = None

    def start(self) -> "ServiceProcess":
        assert self.process is None or self.process.poll() is not None, f"{self.name} already running"
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {self.name} =====\n".encode())
        log.flush()
        self.process = subprocess.Popen([sys.executable, "-m", "servicekit.run", self.name],
                                        env=self.env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self, sig=signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the process and wait for it to exit (SIGKILL after ``timeout``)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"


class Stack:
    """migrate + tickets + routing + gateway on one vhost; the gateway is ready when ``/readyz`` says so."""

    def __init__(self, workdir: Path, vhost: str):
        self.workdir = workdir
        self.vhost = vhost
        self.amqp_uri = amqp_uri(vhost)
        self.gateway_port = free_port()
        self.tickets_port = free_port()
        self.routing_port = free_port()
        self.proxy = TcpProxyProcess(BROKER_HOST, BROKER_PORT, workdir / "proxy.log")
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HELPDESK_", "AMQP_", "TEST_", "PYTEST_"))}
        env.update({
            "PYTHONUNBUFFERED": "1",
            "AMQP_URI": self.amqp_uri,
            "HELPDESK_VAR_DIR": str(workdir),
            "HELPDESK_LOG_LEVEL": "INFO",
            "HELPDESK_TICKETS_HTTP_HOST": "127.0.0.1",
            "HELPDESK_TICKETS_HTTP_PORT": str(self.tickets_port),
            # the outbox relay alone goes through the proxy: stopping it is a broker outage
            # for event publishing while RPC stays up
            "HELPDESK_TICKETS_OUTBOX_AMQP_URI": amqp_uri(vhost, "127.0.0.1", self.proxy.port),
            "HELPDESK_ROUTING_HTTP_HOST": "127.0.0.1",
            "HELPDESK_ROUTING_HTTP_PORT": str(self.routing_port),
            # the safety-net sweep runs often so tests need not wait for it
            "HELPDESK_ROUTING_SWEEP_INTERVAL_SECONDS": "0.5",
            "HELPDESK_ROUTING_OFFLINE_POLICY": "requeue",
            "HELPDESK_GATEWAY_HTTP_HOST": "127.0.0.1",
            "HELPDESK_GATEWAY_HTTP_PORT": str(self.gateway_port),
            "HELPDESK_GATEWAY_RATE_LIMIT_PER_SECOND": str(RATE_LIMIT_PER_SECOND),
            "HELPDESK_GATEWAY_RATE_LIMIT_BURST": str(RATE_LIMIT_BURST),
            "HELPDESK_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        })
        self.env = env
        self.tickets = ServiceProcess("tickets", env, workdir / "tickets.log")
        self.routing = ServiceProcess("routing", env, workdir / "routing.log")
        self.gateway = ServiceProcess("gateway", env, workdir / "gateway.log")
        self.extra_gateways: list[ServiceProcess] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def tickets_url(self) -> str:
        return f"http://127.0.0.1:{self.tickets_port}"

    def logs(self) -> str:
        return "\n".join(f"--- {service.name} log ({service.log_path}) ---\n{service.log_tail()}"
                         for service in (self.tickets, self.routing, self.gateway, *self.extra_gateways))

    def migrate(self) -> None:
        result = subprocess.run([sys.executable, "-m", "servicekit.migrate", "tickets", "routing"], env=self.env,
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"migration failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> "Stack":
        self.proxy.start()
        self.migrate()
        self.tickets.start()
        self.routing.start()
        self.gateway.start()
        self.wait_ready(START_DEADLINE_SECONDS)
        self.wait_routing_ready(START_DEADLINE_SECONDS)
        return self

    def start_extra_gateway(self, **settings) -> str:
        """Another gateway on this stack with ``HELPDESK_GATEWAY_<NAME>`` overrides; its base URL."""
        port = free_port()
        env = {**self.env, "HELPDESK_GATEWAY_HTTP_PORT": str(port),
               **{f"HELPDESK_GATEWAY_{name.upper()}": str(value) for name, value in settings.items()}}
        gateway = ServiceProcess("gateway", env, self.workdir / f"gateway-{port}.log")
        self.extra_gateways.append(gateway)
        gateway.start()
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while not self._probe(base_url + "/readyz"):
            if not gateway.alive or time.monotonic() > deadline:
                raise RuntimeError("extra gateway did not become ready\n" + self.logs())
            time.sleep(0.1)
        return base_url

    def _probe(self, url: str) -> bool:
        try:
            return requests.get(url, timeout=3).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float) -> None:
        """The gateway's /readyz is 200 (broker up, tickets answers RPC) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._probe(self.base_url + "/readyz"):
            for service in (self.tickets, self.routing, self.gateway):
                if not service.alive:
                    raise RuntimeError(f"{service.name} exited with {service.process.returncode}\n"
                                       + self.logs())
            if time.monotonic() > deadline:
                raise RuntimeError(f"stack not ready within {timeout}s\n" + self.logs())
            time.sleep(0.2)

    def wait_tickets_ready(self, timeout: float) -> None:
        """The tickets process's own /readyz (it consumes its RPC queue and reaches its database)."""
        deadline = time.monotonic() + timeout
        while not self._probe(self.tickets_url + "/readyz"):
            if not self.tickets.alive:
                raise RuntimeError(f"tickets exited with {self.tickets.process.returncode}\n" + self.logs())
            if time.monotonic() > deadline:
                raise RuntimeError(f"tickets not ready within {timeout}s\n" + self.logs())
            time.sleep(0.1)

    @property
    def routing_url(self) -> str:
        return f"http://127.0.0.1:{self.routing_port}"

    def wait_routing_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._probe(self.routing_url + "/readyz"):
            if not self.routing.alive:
                raise RuntimeError(f"routing exited with {self.routing.process.returncode}\n" + self.logs())
            if time.monotonic() > deadline:
                raise RuntimeError(f"routing not ready within {timeout}s\n" + self.logs())
            time.sleep(0.1)

    def stop(self) -> None:
        services = (*self.extra_gateways, self.gateway, self.routing, self.tickets)
        for service in services:
            service.terminate()  # all shut down gracefully at the same time
        for service in services:
            service.stop()
        self.proxy.stop()


# --- identities and the HTTP client ----------------------------------------------------------

IDENTITIES = {
    # name: (sub, role, org, org_wide)
    "alice": ("alice@acme", "requester", "acme", False),
    "carol": ("carol@globex", "requester", "globex", False),
    "acme_lead": ("lead@acme", "requester", "acme", True),
    "agent": ("agent-1", "agent", None, False),
    "viewer": ("auditor-1", "viewer", None, False),
    "supervisor": ("supervisor-1", "supervisor", None, False),
    "admin": ("admin-1", "admin", None, False),
}


def token_for(name: str, **overrides) -> str:
    sub, role, org, org_wide = IDENTITIES[name]
    return mint_token(sub, role, org, org_wide, **overrides)


class Api:
    """``api.get("/v1/tickets", as_="alice")``: requests against the gateway as an identity."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session = requests.Session()
        self._tokens = {name: token_for(name) for name in IDENTITIES}

    def sub(self, name: str) -> str:
        return IDENTITIES[name][0]

    def request(self, method: str, path: str, as_: str | None = None, token: str | None = None,
                headers: dict | None = None, **kwargs) -> requests.Response:
        headers = dict(headers or {})
        token = token or (self._tokens[as_] if as_ else None)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", 30)
        return self.session.request(method, self.base_url + path, headers=headers, **kwargs)

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def patch(self, path, **kwargs):
        return self.request("PATCH", path, **kwargs)

    # conveniences for the happy path
    def create_ticket(self, as_: str, **fields) -> dict:
        body = {"subject": "Printer on fire", "description": "It smells of toner.", **fields}
        response = self.post("/v1/tickets", as_=as_, json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def update_ticket(self, ticket_id: str, as_: str, **changes) -> dict:
        current = self.get(f"/v1/tickets/{ticket_id}", as_=as_)
        assert current.status_code == 200, current.text
        response = self.patch(f"/v1/tickets/{ticket_id}", as_=as_, json=changes,
                              headers={"If-Match": current.headers["ETag"]})
        assert response.status_code == 200, response.text
        return response.json()

    def comment(self, ticket_id: str, as_: str, body: str, public: bool = True) -> dict:
        response = self.post(f"/v1/tickets/{ticket_id}/comments", as_=as_,
                             json={"body": body, "public": public})
        assert response.status_code == 201, response.text
        return response.json()


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def broker_admin():
    admin = VhostAdmin.or_skip()
    yield admin
    admin.finish()


@pytest.fixture(scope="module")
def stack(broker_admin, tmp_path_factory):
    """A running stack for this test module; logs are printed if it cannot start."""
    with broker_admin.vhost("hd-e2e") as vhost:
        running = Stack(tmp_path_factory.mktemp("e2e-stack"), vhost)
        try:
            try:
                running.start()
            except Exception as exc:
                print(f"e2e stack failed to start: {exc}", file=sys.stderr)
                raise
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def api(stack):
    client = Api(stack.base_url)
    yield client
    client.session.close()


@pytest.fixture
def amqp(stack):
    """A raw AMQP client on the stack's vhost; it publishes persistent messages."""
    client = AmqpClient(stack.amqp_uri, queue_prefix="e2e", delivery_mode=2)
    yield client
    client.close()


@pytest.fixture
def tag():
    """A tag unique to this test, to find exactly the tickets it made."""
    return f"e2e-{uuid.uuid4().hex[:10]}"
