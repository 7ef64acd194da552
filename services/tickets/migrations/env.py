"""Alembic environment of the tickets service (its tables only)."""
from alembic import context

from servicekit.migrate import run_alembic_env
from services.tickets.models import Base

run_alembic_env(context, Base.metadata)
