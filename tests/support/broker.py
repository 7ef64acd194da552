"""The RabbitMQ the tests run against (``TEST_AMQP_HOST``/``TEST_AMQP_PORT``, guest/guest) and
throwaway vhosts on it."""
import os
import shutil
import subprocess
import uuid
from contextlib import contextmanager
from urllib.parse import quote

import pytest
import requests

BROKER_HOST = os.environ.get("TEST_AMQP_HOST", "localhost")
BROKER_PORT = int(os.environ.get("TEST_AMQP_PORT", "5672"))
BROKER_USER, BROKER_PASSWORD = "guest", "guest"
MANAGEMENT_URL = os.environ.get("TEST_RABBITMQ_MANAGEMENT_URL", "http://localhost:15672")


def amqp_uri(vhost: str, host: str = BROKER_HOST, port: int = BROKER_PORT) -> str:
    return f"amqp://{BROKER_USER}:{BROKER_PASSWORD}@{host}:{port}/{quote(vhost, safe='')}"


class VhostAdmin:
    """Creates and deletes vhosts (guest gets all permissions on them): through the management
    HTTP API when it answers (fast), else with rabbitmqctl; ``TEST_RABBITMQ_ADMIN=rabbitmqctl``
    forces rabbitmqctl.

    Each rabbitmqctl call is a CLI start (~0.4 s), so its deletions run in the background;
    ``finish()`` (at the end of the session) reaps them and fails if any did not succeed.
    """

    def __init__(self, management_url: str = MANAGEMENT_URL):
        self.base_url = management_url.rstrip("/")
        self.auth = (BROKER_USER, BROKER_PASSWORD)
        self.use_api = os.environ.get("TEST_RABBITMQ_ADMIN") != "rabbitmqctl" and self._api_answers()
        self._pending = []  # (vhost, background rabbitmqctl delete_vhost)

    @classmethod
    def or_skip(cls) -> "VhostAdmin":
        """An admin, or skip the test when there is neither a management API nor rabbitmqctl."""
        admin = cls()
        if not admin.use_api and shutil.which("rabbitmqctl") is None:
            pytest.skip("no RabbitMQ management API and no rabbitmqctl to create test vhosts")
        return admin

    def _api_answers(self) -> bool:
        try:
            return requests.get(f"{self.base_url}/api/overview", auth=self.auth, timeout=2).ok
        except requests.RequestException:
            return False

    def add(self, name: str) -> None:
        if self.use_api:
            vh = quote(name, safe="")
            requests.put(f"{self.base_url}/api/vhosts/{vh}", auth=self.auth, timeout=10).raise_for_status()
            requests.put(f"{self.base_url}/api/permissions/{vh}/{BROKER_USER}", auth=self.auth, timeout=10,
                         json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()
        else:
            self._ctl("add_vhost", name)
            self._ctl("set_permissions", "-p", name, BROKER_USER, ".*", ".*", ".*")

    def delete(self, name: str) -> None:
        if self.use_api:
            response = requests.delete(f"{self.base_url}/api/vhosts/{quote(name, safe='')}",
                                       auth=self.auth, timeout=10)
            if response.status_code not in (204, 404):
                response.raise_for_status()
        else:
            self._pending.append((name, subprocess.Popen(
                ["rabbitmqctl", "--quiet", "delete_vhost", name],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))

    @contextmanager
    def vhost(self, prefix: str):
        """A fresh vhost named ``<prefix>-<random>`` for the ``with`` block; yields its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.add(name)
        try:
            yield name
        finally:
            self.delete(name)

    def finish(self) -> None:
        """Wait for the background deletions; raise if any failed."""
        failed = []
        for name, process in self._pending:
            _, stderr = process.communicate(timeout=60)
            if process.returncode != 0:
                failed.append(f"{name}: {stderr.decode(errors='replace').strip()}")
        self._pending.clear()
        if failed:
            raise RuntimeError("could not delete test vhosts: " + "; ".join(failed))

    @staticmethod
    def _ctl(*args):
        subprocess.run(["rabbitmqctl", "--quiet", *args], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
