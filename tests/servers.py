"""Engine subprocesses for tests: their environment, and a real `vllm serve` started
on a free loopback port, its output collected, waited for until healthy, stopped at
the end."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from vllm_quarot.eval.server import free_port, health


def engine_env(**env_vars: str) -> dict:
    """The environment of an engine subprocess: a small KV cache, and Triton's
    interpreter (which conftest sets for in-process tests) only when asked for."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("TRITON_INTERPRET", None)
    return env | env_vars


@contextlib.contextmanager
def vllm_server(model: Path, *args: str, env: dict,
                start_timeout: float = 600) -> Iterator[tuple[int, list[str], subprocess.Popen]]:
    """(port, output lines so far, process) of `vllm serve model *args`, healthy."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("vllm")), "serve", str(model), *args,
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.time() + start_timeout
        while health(port) != 200:
            assert server.poll() is None and time.time() < deadline, "".join(log)[-6000:]
            time.sleep(2)
        yield port, log, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
