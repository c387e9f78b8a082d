"""``free_port``: a free loopback TCP port, for the services and closed addresses the tests use.

Importable from every test module (pytest puts ``tests/`` on ``sys.path`` for the top-level
conftest); the one copy.
"""
from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
