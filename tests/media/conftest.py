"""Fixtures for media tests (see tests/support/clients.py)."""

from tests.support.clients import matrix_server

__all__ = ["matrix_server"]
