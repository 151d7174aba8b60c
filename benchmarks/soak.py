"""Soak test (not CI): one `vllm serve` on a QuaRot checkpoint under a mixed load.

N client threads send completions for --duration seconds (bounded by --max-requests):
long prompts (prefilled in chunks: --max-num-batched-tokens 256) and short ones,
streaming and not, streams closed by the client mid-way (aborts), per-request seeds,
n>1, logprobs, stop strings. Before the load, K greedy probes run alone; during the
load the same probes run again and their token ids must be the same. Prints a
markdown table (requests ok / failed, output tokens/s, latency p50/p99, probes equal,
server healthy afterwards). Talks to 127.0.0.1 only.

    .venv/bin/python benchmarks/soak.py CKPT [--duration 60] [--concurrency 8]
    .venv/bin/python benchmarks/soak.py --make-tiny /tmp/tiny-w4a4kv4 --duration 60 \
        --out benchmarks/results/soak_tiny_w4a4kv4.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from vllm_quarot.eval.server import HOST, free_port, health

MODEL_NAME = "soak"
WORDS = ("Once upon a time there was a little girl named Lily who liked to play in the "
         "park with her friend Tom and one day they found a big red ball").split()


def make_tiny(out: Path, scheme: str = "w4a4kv4") -> Path:
    """An RTN checkpoint (default W4A4KV4) of the tests' tiny random Llama (needs the
    shared data folder for the tokenizer)."""
    if (out / "config.json").is_file():
        return out
    from vllm_quarot.eval.zoo import make_random_model
    from vllm_quarot.offline.quantize import QuantizeOptions, quantize

    src = make_random_model(out.with_name(out.name + "-src"))
    quantize(src, out, QuantizeOptions(scheme=scheme, weight_method="rtn"))
    return out


def post(port: int, body: dict, timeout: float, abort_after: int | None = None) -> dict:
    """One completion. Returns {status, tokens, token_ids, aborted, error}."""
    req = urllib.request.Request(
        f"http://{HOST}:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"})
    res = {"status": -1, "tokens": 0, "token_ids": None, "aborted": False, "error": None}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            res["status"] = r.status
            if not body.get("stream"):
                out = json.loads(r.read())
                res["tokens"] = out["usage"]["completion_tokens"]
                res["token_ids"] = out["choices"][0].get("token_ids")
                return res
            chunks = 0
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return res
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res["tokens"] = chunk["usage"]["completion_tokens"]
                chunks += 1
                if abort_after is not None and chunks >= abort_after:
                    res["aborted"] = True  # leaving the with-block closes the socket
                    return res
            res["error"] = "stream ended without [DONE]"
    except urllib.error.HTTPError as e:
        res["status"], res["error"] = e.code, e.read().decode(errors="replace")[:300]
    except (OSError, ValueError, KeyError) as e:
        res["error"] = repr(e)[:300]
    return res


def random_request(rng: random.Random, max_prompt: int) -> tuple[dict, int | None]:
    body: dict = {"model": MODEL_NAME, "max_tokens": rng.choice([8, 16, 32])}
    if rng.random() < 0.4:  # long: token ids, prefilled in several chunks
        n = rng.randrange(max_prompt // 2, max_prompt)
        body["prompt"] = [1] + [rng.randrange(3, 500) for _ in range(n - 1)]
    else:
        body["prompt"] = " ".join(rng.choices(WORDS, k=rng.randrange(3, 40)))
    body["temperature"] = 0.0 if rng.random() < 0.2 else rng.choice([0.7, 1.0])
    if body["temperature"] and rng.random() < 0.5:
        body["seed"] = rng.randrange(1 << 30)
    if body["temperature"] and rng.random() < 0.15:
        body["n"] = rng.choice([2, 3])
    if rng.random() < 0.2:
        body["logprobs"] = rng.choice([1, 5])
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(["e", " the", "."])]
    abort_after = None
    if rng.random() < 0.3:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.3:
            abort_after = rng.randrange(1, 4)
    return body, abort_after


def probe_body(i: int, max_prompt: int) -> dict:
    rng = random.Random(1000 + i)
    n = max_prompt // 2 if i % 2 else 12
    return {"model": MODEL_NAME, "prompt": [1] + [rng.randrange(3, 500) for _ in range(n)],
            "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt", nargs="?", help="QuaRot checkpoint (or use --make-tiny)")
    ap.add_argument("--make-tiny", type=Path, default=None,
                    help="build (if missing) an RTN checkpoint of the tiny random Llama "
                         "here and serve it")
    ap.add_argument("--scheme", default="w4a4kv4", help="of --make-tiny")
    ap.add_argument("--duration", type=float, default=60.0, help="load phase, seconds")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-requests", type=int, default=5000, help="bound on requests")
    ap.add_argument("--probes", type=int, default=4, help="greedy probes (K)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--timeout", type=float, default=180.0, help="per request, seconds")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    a = ap.parse_args()
    if a.make_tiny:
        ckpt = make_tiny(a.make_tiny, a.scheme)
    elif a.ckpt:
        ckpt = Path(a.ckpt)
    else:
        ap.error("give CKPT or --make-tiny DIR")
    duration = min(a.duration, 3600.0)
    max_prompt = a.max_model_len - 40

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="soak-server-",
                                      delete=False)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(ckpt),
           "--quantization", "quarot", "--host", HOST, "--port", str(port),
           "--max-model-len", str(a.max_model_len),
           "--max-num-batched-tokens", str(a.max_num_batched_tokens),
           "--max-num-seqs", str(max(16, 2 * a.concurrency)), "--enforce-eager",
           "--dtype", a.dtype, "--served-model-name", MODEL_NAME]
    print(f"server log: {log.name}", flush=True)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 900
        while health(port) != 200:
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                sys.exit("server did not start:\n" + log.read()[-6000:])
            time.sleep(2)

        alone = [post(port, probe_body(i, max_prompt), a.timeout) for i in range(a.probes)]
        assert all(p["status"] == 200 for p in alone), alone

        results: list[dict] = []
        lock = threading.Lock()
        counter = iter(range(a.max_requests))
        t_end = time.time() + duration

        def worker(w: int) -> None:
            rng = random.Random(w)
            while time.time() < t_end:
                with lock:
                    if next(counter, None) is None:
                        return
                body, abort_after = random_request(rng, max_prompt)
                t0 = time.time()
                r = post(port, body, a.timeout, abort_after)
                r["latency"] = time.time() - t0
                with lock:
                    results.append(r)

        probe_rounds: list[list[bool]] = []

        def prober() -> None:
            time.sleep(min(5.0, duration / 4))  # let the load build up
            while time.time() < t_end - 5:
                rnd = [post(port, probe_body(i, max_prompt), a.timeout)
                       for i in range(a.probes)]
                probe_rounds.append([p["status"] == 200 and p["token_ids"] == q["token_ids"]
                                     for p, q in zip(rnd, alone, strict=True)])

        t0 = time.time()
        threads = [threading.Thread(target=worker, args=(w,)) for w in range(a.concurrency)]
        threads.append(threading.Thread(target=prober))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t0
        healthy = server.poll() is None and health(port) == 200
        after = post(port, probe_body(0, max_prompt), a.timeout)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    log.seek(0)
    server_log = log.read()

    ok = [r for r in results if r["status"] == 200 and not r["error"]]
    done = [r for r in ok if not r["aborted"]]
    failed = [r for r in results if r not in ok]
    tokens = sum(r["tokens"] for r in done)
    lat = [r["latency"] for r in done]
    probes_ok = sum(all(rnd) for rnd in probe_rounds)
    rows = [
        ("requests sent", len(results)),
        ("ok (completed / client-aborted)",
         f"{len(ok)} ({len(done)} / {len(ok) - len(done)})"),
        ("failed", len(failed)),
        ("output tokens/s (completed requests)", f"{tokens / wall:.1f}"),
        ("latency p50 / p99 (s)", f"{pct(lat, 0.5):.2f} / {pct(lat, 0.99):.2f}"),
        (f"greedy probes under load == alone ({a.probes} per round)",
         f"{probes_ok}/{len(probe_rounds)} rounds"),
        ("server healthy after load (/health, one more request)",
         "yes" if healthy and after["token_ids"] == alone[0]["token_ids"] else "NO"),
        ("engine errors in server log",
         sum("EngineDeadError" in x or "Traceback" in x for x in server_log.splitlines())),
    ]
    table = "\n".join([
        f"# Soak: `vllm serve` on {ckpt.name} (CPU, {a.dtype}, "
        f"--max-num-batched-tokens {a.max_num_batched_tokens})",
        "",
        f"Command: `.venv/bin/python benchmarks/soak.py {' '.join(sys.argv[1:])}`",
        "",
        f"{a.concurrency} client threads for {wall:.0f} s: long (chunked) and short "
        "prompts, streaming and not, client aborts, seeds, n>1, logprobs, stop strings.",
        "",
        "| metric | value |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in rows],
    ])
    print(table)
    for r in failed[:5]:
        print(f"failed: status {r['status']}: {r['error']}", file=sys.stderr)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
