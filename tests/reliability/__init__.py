"""Reliability and security tests (issue #7)."""
