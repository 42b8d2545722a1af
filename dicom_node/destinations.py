"""The configured ``[[destinations]]`` as catalog rows.

The receiver (``cspine serve``) owns the destination table: when it starts, it makes
the rows match its configuration (:func:`sync`). Workers and the admin CLI read the
rows (:func:`active`); they never change them, so a command run with another
configuration file cannot switch a destination off or change its transport.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from config import NodeError, Settings
from config.settings import Destination
from storage import Catalog
from storage.outbox import list_destinations, sync_destinations
from storage.records import DestinationInfo, DestinationSpec


def spec_of(dest: Destination) -> DestinationSpec:
    """The storage spec of one configured destination (named ``AE@HOST:PORT``, or its
    URL, unless it has a ``name``); its credentials are not part of it."""
    if dest.kind == "cstore":
        return DestinationSpec(
            name=dest.label,
            ae_title=dest.ae_title,
            host=dest.host,
            port=dest.port,
            tls=dest.tls,
            outputs=tuple(dest.outputs),
        )
    parts = urlsplit(str(dest.url))
    https = parts.scheme == "https"
    return DestinationSpec(
        name=dest.label,
        ae_title="",
        host=parts.hostname or "",
        port=parts.port or (443 if https else 80),
        tls=https,
        outputs=tuple(dest.outputs),
        kind=dest.kind,
        url=dest.url,
    )


def configured(settings: Settings, name: str) -> Destination | None:
    """The configured destination of that name (where a sender finds its credentials)."""
    for dest in settings.destinations:
        if dest.label == name:
            return dest
    return None


def sync(settings: Settings, catalog: Catalog) -> list[DestinationInfo]:
    """Make the catalog's destination rows match ``settings``; returns the active ones.

    Raises
    ------
    NodeError
        When two destinations have the same name.
    """
    try:
        return sync_destinations(catalog, [spec_of(d) for d in settings.destinations])
    except ValueError as exc:
        raise NodeError(str(exc)) from exc


def active(catalog: Catalog) -> list[DestinationInfo]:
    """The destinations deliveries are queued for now."""
    return list_destinations(catalog, active_only=True)


def choose(catalog: Catalog, ref: str | None) -> list[DestinationInfo] | None:
    """The destination named ``ref`` (its name, ``AE@HOST:PORT`` or id), or ``None``
    (every active destination) when ``ref`` is ``None``.

    Raises
    ------
    NodeError
        When ``ref`` names no active destination, or none is active.
    """
    rows = active(catalog)
    if ref is None:
        if not rows:
            raise NodeError("no destination: configure [[destinations]] and restart the node")
        return None
    for row in rows:
        if ref in (row.name, row.address, str(row.id)):
            return [row]
    known = ", ".join(r.name for r in rows) or "none"
    raise NodeError(
        f"{ref!r} is not an active destination (active: {known}); results go only to "
        "configured destinations, over their configured transport"
    )
