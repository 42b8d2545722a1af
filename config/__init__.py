"""Typed settings, embedded defaults and base errors of cspine-node."""

from config.errors import ConfigError, NodeError
from config.settings import (
    Destination,
    Peer,
    Settings,
    check_bind_safety,
    load_settings,
    parse_ae_spec,
)

__all__ = [
    "ConfigError",
    "Destination",
    "NodeError",
    "Peer",
    "Settings",
    "check_bind_safety",
    "load_settings",
    "parse_ae_spec",
]
