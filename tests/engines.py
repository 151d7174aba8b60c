"""Real vLLM engines for tests, each in its own process (tests/run_vllm.py), shared.

An engine is started once per (model, engine options, environment) and then serves
every test that differs from another only per request (prompts, max_tokens, one at a
time or batched): ``engine(model, *options, **env)`` returns the running one or starts
it. At most ``MAX_ALIVE`` stay up (the least recently used one is stopped first); all
are stopped at the end of the session. ``run_vllm`` is the one-shot form for an engine
used once.

Both run vLLM's engine core inside the runner's process (``IN_PROCESS``): vLLM's default
puts it in a process of its own and, on CPU, the model in a third, each importing vLLM
again — ~20 s more per engine start on a 2-core machine, for nothing these tests check
(the tensor- and pipeline-parallel engines still spawn one worker per rank). The default
layout is what the `vllm serve` tests (test_server_robustness, test_zeroshot), the CLI
tests and the refusal walk run; a test can ask for it with
``VLLM_ENABLE_V1_MULTIPROCESSING="1"``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from servers import engine_env

RUNNER = Path(__file__).parent / "run_vllm.py"
MAX_ALIVE = 2
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
START_TIMEOUT = 900


class EngineProcess:
    """run_vllm.py --serve: started once, then one request per call of run()."""

    def __init__(self, model: Path, args: tuple[str, ...], env: dict[str, str]):
        self.key = (str(model), args, tuple(sorted(env.items())))
        self.lines: list[str] = []
        self._results: list[dict] = []
        self._ready = threading.Event()
        self._got = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), str(model), *args, "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=engine_env(**(IN_PROCESS | env)))
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while (not self._ready.wait(1.0) and self.proc.poll() is None
               and time.monotonic() < deadline):
            pass
        if not self._ready.is_set() or self.proc.poll() is not None:
            self.close()
            raise AssertionError(f"vLLM engine {self.key} did not start:\n{self.log[-6000:]}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("ENGINE_READY"):
                self._ready.set()
            elif line.startswith("RESULT_JSON "):
                with self._got:
                    self._results.append(json.loads(line.removeprefix("RESULT_JSON ")))
                    self._got.notify_all()
        self._ready.set()  # the process ended: wake whoever waits
        with self._got:
            self._got.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def run(self, prompts: list[str], max_tokens: int = 32, sequential: bool = False,
            timeout: float = 600, prompt_logprobs: bool = True) -> dict:
        """Greedy tokens and prompt log-probs of prompts (none without prompt_logprobs:
        only such requests read vLLM's prefix cache); "log" is everything the engine
        printed so far (its kernel choices, KV cache size, ...)."""
        assert self.proc.stdin is not None
        with self._got:
            n = len(self._results)
            self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens,
                                              "sequential": sequential,
                                              "prompt_logprobs": prompt_logprobs}) + "\n")
            self.proc.stdin.flush()
            # re-checked every second, not only when a line arrives: a runner that died
            # while a child of it still holds its stdout sends no EOF to wake us
            deadline = time.monotonic() + timeout
            while (len(self._results) <= n and self.proc.poll() is None
                   and time.monotonic() < deadline):
                self._got.wait(1.0)
            if len(self._results) <= n:
                raise AssertionError(f"vLLM engine {self.key} failed a request:\n"
                                     f"{self.log[-6000:]}")
            out = dict(self._results[n])
        out["log"] = self.log
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=120)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait()


class EnginePool:
    def __init__(self) -> None:
        self.alive: OrderedDict[tuple, EngineProcess] = OrderedDict()
        self.started = 0

    def __call__(self, model: Path, *args: str, **env: str) -> EngineProcess:
        key = (str(model), tuple(args), tuple(sorted(env.items())))
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= MAX_ALIVE:
            self.alive.popitem(last=False)[1].close()
        engine = EngineProcess(model, tuple(args), dict(env))
        self.started += 1
        self.alive[key] = engine
        return engine

    def close(self) -> None:
        while self.alive:
            self.alive.popitem()[1].close()


def _prompt_file(prompts: list[str]) -> str:
    f = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(prompts, f)
    f.close()
    return f.name


def run_vllm(model: Path, *args: str, prompts: list[str], **env_vars: str) -> dict:
    """One engine, one batch, then the process exits."""
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(model), *args, "--prompt-file",
         _prompt_file(prompts)],
        capture_output=True, text=True, env=engine_env(**(IN_PROCESS | env_vars)),
        timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            out = json.loads(line.removeprefix("RESULT_JSON "))
            out["log"] = proc.stdout + proc.stderr
            return out
    raise AssertionError(f"vLLM run failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}")


def walk_refusals(cases: list[dict]) -> dict[str, str]:
    """Every must-refuse case in one process: {id: what LLM(...) raised and everything
    the engine printed for it}."""
    path = _prompt_file(cases)  # a JSON file like any other
    proc = subprocess.run([sys.executable, str(RUNNER), "--refusals", path],
                          capture_output=True, text=True, env=engine_env(), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    out: dict[str, str] = {}
    for stream in (proc.stderr, proc.stdout):
        for chunk in stream.split("=== CASE ")[1:]:
            case_id, _, text = chunk.partition(" ===\n")
            out[case_id] = out.get(case_id, "") + text.split("=== END ===")[0]
    assert set(out) == {c["id"] for c in cases}, (set(out), proc.stderr[-3000:])
    return out
