"""Shared fixtures of the reliability suite: the loopback SCP fixtures of tests/dicom_node."""

from __future__ import annotations

from tests.dicom_node.conftest import node, start_node  # noqa: F401  (pytest fixtures)
