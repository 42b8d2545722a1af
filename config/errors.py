"""Base errors shared by every package of the node."""

from __future__ import annotations


class NodeError(Exception):
    """Base class of every error the node raises on purpose.

    Its message is meant for an administrator: one line, no stack trace needed.
    """


class ConfigError(NodeError):
    """Settings are missing, malformed or unsafe."""
