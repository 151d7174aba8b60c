"""Talking to a local `vllm serve` (tests and benchmarks/soak.py): a free loopback
port, and the server's /health status."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def health(port: int) -> int:
    """/health's HTTP status, -1 when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1
