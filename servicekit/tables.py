"""Tables every service owns a copy of (in its own database): the outbox and handled events.

Each service calls ``add_infrastructure_tables(metadata)`` so its Alembic migrations create them;
servicekit code queries through the module-level ``OUTBOX`` and ``HANDLED_EVENTS`` objects.
"""
from sqlalchemy import JSON, BigInteger, Column, Index, Integer, MetaData, String, Table

from servicekit.types import UtcDateTime as DateTime

_metadata = MetaData()

OUTBOX = Table(
    "outbox",
    _metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("event_id", String(36), nullable=False, unique=True),
    Column("source", String(50), nullable=False),
    Column("event_type", String(100), nullable=False),
    Column("envelope", JSON, nullable=False),
    Column("request_id", String(128)),
    Column("created_at", DateTime(), nullable=False),
    Column("published_at", DateTime()),
    Column("attempts", Integer, nullable=False, default=0),
    Index("ix_outbox_unpublished", "published_at", "id"),
)

HANDLED_EVENTS = Table(
    "handled_events",
    _metadata,
    Column("handler", String(200), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("handled_at", DateTime(), nullable=False),
)


def add_infrastructure_tables(metadata: MetaData) -> None:
    for table in (OUTBOX, HANDLED_EVENTS):
        table.to_metadata(metadata)


# constraint and index names every service's migrations share, so Alembic can name what it alters
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def service_metadata() -> MetaData:
    """A service's MetaData: the shared naming convention and the outbox / handled-events tables."""
    metadata = MetaData(naming_convention=NAMING)
    add_infrastructure_tables(metadata)
    return metadata
