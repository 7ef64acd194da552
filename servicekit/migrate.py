"""Apply a service's Alembic migrations: ``python -m servicekit.migrate tickets [--url URL]``."""
import argparse
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from servicekit.config import REPO_ROOT, ServiceSettings

MIGRATING_SERVICES = ("tickets", "routing")


def alembic_config(service: str, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(REPO_ROOT, "services", service, "migrations")))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(service: str, url: str | None = None, revision: str = "head") -> None:
    url = url or ServiceSettings.load(service).database_url
    command.upgrade(alembic_config(service, url), revision)


def run_alembic_env(context, target_metadata) -> None:
    """The body of every service's ``migrations/env.py``: batch mode (SQLite cannot ALTER most
    things in place), ``postgresql://`` URLs through psycopg2, offline and online modes."""
    from sqlalchemy import create_engine, pool

    url = context.config.get_main_option("sqlalchemy.url")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url[len("postgresql://"):]
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("services", nargs="*", default=list(MIGRATING_SERVICES))
    parser.add_argument("--url", help="database URL (default: the service's setting)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for service in args.services:
        upgrade(service, args.url)
        print(f"migrated {service}")


if __name__ == "__main__":
    main()
