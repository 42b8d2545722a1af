"""Catalog schema commands: ``cspine db upgrade`` and ``cspine db current``."""

from __future__ import annotations

import click

from dicom_node.cli.common import make_settings, settings_options


@click.group()
def db() -> None:
    """Catalog schema migrations (every node process also upgrades when it opens it)."""


@db.command()
@settings_options
def upgrade(config_file: str | None, data_dir: str | None) -> None:
    """Bring the catalog to the newest schema, in place, keeping every row."""
    from storage.db import make_engine
    from storage.migrate import upgrade as run_upgrade

    settings = make_settings(config_file, data_dir)
    engine = make_engine(settings.storage.url, migrate=False)
    before, after = run_upgrade(engine)
    if before == after:
        click.echo(f"catalog already at revision {after}")
    else:
        click.echo(f"catalog upgraded from {before or 'empty'} to revision {after}")


@db.command()
@settings_options
def current(config_file: str | None, data_dir: str | None) -> None:
    """Print the catalog's schema revision and the newest this release knows."""
    from storage.db import make_engine
    from storage.migrate import current_revision, head_revision

    settings = make_settings(config_file, data_dir)
    engine = make_engine(settings.storage.url, migrate=False)
    rev = current_revision(engine) or "not under migrations"
    click.echo(f"catalog revision {rev}; newest {head_revision()}")


COMMANDS: list[click.Command] = [db]
