"""Errors raised by the AI package."""

from __future__ import annotations

from config.errors import NodeError


class AIError(NodeError):
    """Base class of AI errors."""


class ModelLoadError(AIError):
    """A model package is missing, corrupted or does not match its description."""


class InferenceError(AIError):
    """Inference could not produce a result."""


class VolumeError(AIError):
    """A series cannot be turned into a volume (a permanent, explained refusal)."""
