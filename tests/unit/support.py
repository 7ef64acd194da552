"""Helpers for the unit tests: migrated SQLite databases, a controllable clock, actors and a
``Desk`` running each tickets operation in its own committed transaction.

Alembic runs once per session into a template file; each test gets a byte copy of it, so a
test costs a file copy instead of a migration.
"""
import atexit
import shutil
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from servicekit.db import UnitOfWork
from servicekit.migrate import upgrade
from services.tickets import operations, schemas
from services.tickets.access import Actor

_template: Path | None = None


def migrated_template(directory: Path) -> Path:
    """The migrated database all copies start from (built on first use)."""
    global _template
    if _template is None or not _template.exists():
        path = directory / "tickets-template.db"
        upgrade("tickets", f"sqlite:///{path}")
        _template = path
    return _template


def fresh_database(directory: Path, template_dir: Path) -> str:
    """Copy the migrated template into ``directory``; returns its URL."""
    path = directory / "tickets.db"
    shutil.copyfile(migrated_template(template_dir), path)
    return f"sqlite:///{path}"


_scratch_root: Path | None = None


def scratch_database() -> tuple[str, Path]:
    """A migrated database outside pytest's fixtures (for hypothesis state machines, which
    build one per example); the caller removes the returned directory."""
    global _scratch_root
    if _scratch_root is None:
        _scratch_root = Path(tempfile.mkdtemp(prefix="tickets-unit-"))
        atexit.register(shutil.rmtree, _scratch_root, ignore_errors=True)
    directory = Path(tempfile.mkdtemp(dir=_scratch_root))
    template = _template if _template is not None and _template.exists() else None
    return fresh_database(directory, template.parent if template else _scratch_root), directory


class Clock:
    """A controllable ``operations._now``: every reading advances time by ``tick``."""

    def __init__(self, start: datetime, tick: timedelta = timedelta(seconds=1)):
        self.now = start
        self.tick = tick

    def __call__(self) -> datetime:
        moment = self.now
        self.now = self.now + self.tick
        return moment

    def advance(self, **kwargs) -> None:
        self.now = self.now + timedelta(**kwargs)


T0 = datetime(2026, 1, 5, 9, 0, tzinfo=timezone.utc)


# --- actors ----------------------------------------------------------------------------------

AGENT = Actor("agent-1", "agent")
AGENT_2 = Actor("agent-2", "agent")
SUPERVISOR = Actor("supervisor-1", "supervisor")
ADMIN = Actor("admin-1", "admin")
VIEWER = Actor("viewer-1", "viewer")
ALICE = Actor("alice", "requester", "acme")
BOB = Actor("bob", "requester", "acme")
ACME_MANAGER = Actor("carol", "requester", "acme", org_wide=True)
MALLORY = Actor("mallory", "requester", "globex", org_wide=True)

_create_schema = schemas.CreateTicketSchema()
_update_schema = schemas.UpdateTicketSchema()
_list_schema = schemas.ListTicketsSchema()


def create_data(**fields) -> dict:
    """A create payload as the service hands it to operations (validated and defaulted)."""
    return _create_schema.load({"subject": "Printer on fire", "description": "Please help", **fields})


def update_data(**fields) -> dict:
    return _update_schema.load(fields)


def list_filters(**fields) -> dict:
    return _list_schema.load(fields)


class Desk:
    """Operations each in their own committed transaction, as the service runs them."""

    def __init__(self, uow: UnitOfWork):
        self.uow = uow

    def create(self, actor=ALICE, idempotency_key=None, **fields) -> dict:
        with self.uow.transaction() as session:
            ticket, _ = operations.create_ticket(session, actor, create_data(**fields), idempotency_key)
        return ticket

    def update(self, actor, ticket_id, expected_version=None, **fields) -> dict:
        with self.uow.transaction() as session:
            return operations.update_ticket(session, actor, ticket_id, update_data(**fields), expected_version)

    def assign(self, actor, ticket_id, assignee_id, group=None, expected_version=None) -> dict:
        with self.uow.transaction() as session:
            return operations.assign_ticket(session, actor, ticket_id, assignee_id, group, expected_version)

    def comment(self, actor, ticket_id, body="Thanks", public=True, idempotency_key=None) -> dict:
        with self.uow.transaction() as session:
            comment, _ = operations.add_comment(session, actor, ticket_id, body, public, idempotency_key)
        return comment

    def get(self, actor, ticket_id) -> dict:
        with self.uow.read() as session:
            return operations.get_ticket(session, actor, ticket_id)

    def list_tickets(self, actor=AGENT, **filters) -> dict:
        with self.uow.read() as session:
            return operations.list_tickets(session, actor, list_filters(**filters))

    def comments(self, actor, ticket_id) -> list[dict]:
        with self.uow.read() as session:
            return operations.list_comments(session, actor, ticket_id)["items"]

    def history(self, actor, ticket_id) -> dict:
        with self.uow.read() as session:
            return operations.get_history(session, actor, ticket_id)
