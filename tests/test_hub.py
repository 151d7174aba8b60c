"""resolve_model: a local directory, or a Hugging Face Hub id looked up in an isolated
HF cache. No test reaches the network: the offline ones never send a request, the
online ones talk to 127.0.0.1 only (a closed port, or a stub Hub in a thread)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from vllm_quarot.offline.hub import resolve_model
from vllm_quarot.offline.options import QuantizeError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens, connect() is refused


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """An empty HF home and cache under tmp_path, offline.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_ENDPOINT / the token
    path into ``huggingface_hub.constants`` once, when it is imported, and its functions read
    those module attributes at call time (``snapshot_download``: ``constants.HF_HUB_CACHE``;
    the HTTP hook: ``constants.is_offline_mode()``; ``HfApi``: ``constants.ENDPOINT``), so the
    constants are patched as well as the environment."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    env = {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": CLOSED_PORT, "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE",
              "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(k, raising=False)
    url_template = CLOSED_PORT + "/{repo_id}/resolve/{revision}/{filename}"
    consts = {"HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": True,
              "ENDPOINT": CLOSED_PORT, "HUGGINGFACE_CO_URL_TEMPLATE": url_template,
              "HF_TOKEN_PATH": str(home / "token"),
              "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
              "HF_HUB_ETAG_TIMEOUT": 2, "HF_HUB_DOWNLOAD_TIMEOUT": 2,
              "HF_HUB_DISABLE_TELEMETRY": True}
    for k, v in consts.items():
        assert hasattr(constants, k), k  # a renamed constant would silently not isolate
        monkeypatch.setattr(constants, k, v)
    return cache


def _online(monkeypatch, endpoint: str = CLOSED_PORT) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")


def _cache_repo(cache: Path, repo_id: str, files: dict[str, str | None]) -> Path:
    """The HF cache layout, by hand: refs/main -> COMMIT, snapshots/COMMIT/<files>
    (None: a tiny safetensors file)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name, text in files.items():
        if text is None:
            save_file({"w": torch.zeros(2, 2)}, str(snap / name))
        else:
            (snap / name).write_text(text)
    return snap


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_local_directory_is_returned_as_is(tmp_path, hf_env):
    model = tmp_path / "my-model"
    model.mkdir()
    assert resolve_model(model) == model
    assert resolve_model(str(model)) == model


def test_local_file_is_an_error(tmp_path, hf_env):
    f = tmp_path / "model.safetensors"
    f.write_text("")
    with pytest.raises(QuantizeError) as e:
        resolve_model(f)
    assert "is not a directory" in _one_line(e)


def test_revision_with_local_directory_is_an_error(tmp_path, hf_env):
    with pytest.raises(QuantizeError) as e:
        resolve_model(tmp_path, revision="v1")
    assert "Hub id only" in _one_line(e)


def test_neither_path_nor_repo_id(tmp_path, hf_env):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(QuantizeError) as e:
        resolve_model(missing)
    assert _one_line(e) == f"{missing}: no such directory"
    with pytest.raises(QuantizeError) as e:
        resolve_model("foo--bar")  # not a valid repo id
    assert _one_line(e) == "foo--bar: no such directory"


def test_cached_snapshot_resolves_offline(hf_env, monkeypatch):
    snap = _cache_repo(hf_env, "org/name", {"config.json": "{}", "model.safetensors": None})
    monkeypatch.chdir(hf_env)  # no ./org/name here
    assert resolve_model("org/name") == snap
    assert resolve_model("org/name", revision=COMMIT) == snap
    # a name without an organisation
    snap2 = _cache_repo(hf_env, "gpt2", {"config.json": "{}", "model.safetensors": None})
    assert resolve_model("gpt2") == snap2


def test_offline_not_cached(hf_env, monkeypatch):
    monkeypatch.chdir(hf_env)
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/missing")
    cli = "hf" if int(__import__("huggingface_hub").__version__.split(".")[0]) >= 1 \
        else "huggingface-cli"
    assert _one_line(e) == (
        "org/missing is not a local directory and not in the Hugging Face cache "
        f"(HF_HUB_OFFLINE=1): download it first with `{cli} download org/missing` "
        "or give a local path")
    # cached, but not at this revision
    _cache_repo(hf_env, "org/name", {"config.json": "{}", "model.safetensors": None})
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/name", revision="v2")
    assert f"`{cli} download org/name --revision v2`" in _one_line(e)


def test_cached_repo_without_safetensors(hf_env, monkeypatch):
    monkeypatch.chdir(hf_env)
    _cache_repo(hf_env, "org/bin-only", {"config.json": "{}"})
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/bin-only")
    msg = _one_line(e)
    assert "no *.safetensors" in msg and "PyTorch .bin checkpoints are not read" in msg


def test_hub_unreachable(hf_env, monkeypatch):
    _online(monkeypatch)  # HF_HUB_OFFLINE unset, the Hub at a closed local port
    monkeypatch.chdir(hf_env)
    t0 = time.monotonic()
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/not-cached")
    assert time.monotonic() - t0 < 10
    msg = _one_line(e)
    assert msg.startswith("org/not-cached: no such local directory, "
                          "and the Hugging Face Hub could not be reached ("), msg
    assert msg.endswith("to fetch it (nor is it in the Hugging Face cache)"), msg
    # a cached snapshot is still used when the Hub cannot be reached
    snap = _cache_repo(hf_env, "org/name", {"config.json": "{}", "model.safetensors": None})
    assert resolve_model("org/name") == snap


class _StubHub(http.server.BaseHTTPRequestHandler):
    """Answers the model-info call: /api/models/<org>/<name>[/revision/<rev>]."""

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0]
        if path.startswith("/api/models/org/gated"):
            self._send(403, "GatedRepo")
        elif path.startswith("/api/models/org/name/revision/"):
            self._send(404, "RevisionNotFound")
        else:
            self._send(404, "RepoNotFound")

    def _send(self, status: int, code: str) -> None:
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StubHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hub_errors(hf_env, monkeypatch, stub_hub):
    _online(monkeypatch, stub_hub)
    monkeypatch.chdir(hf_env)
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/absent")
    assert "no such model repo on the Hugging Face Hub" in _one_line(e)
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/gated")
    assert "is a gated repo" in _one_line(e)
    with pytest.raises(QuantizeError) as e:
        resolve_model("org/name", revision="nope")
    assert _one_line(e) == "org/name: revision nope not found on the Hugging Face Hub"


def test_cli_quantizes_a_cached_hub_id_offline(hf_env, monkeypatch, tmp_path, capsys):
    """`vllm-quarot quantize org/stories OUT` with HF_HUB_OFFLINE=1 and the model in the
    HF cache: it is read from the snapshot, and the checkpoint records the Hub id."""
    import json

    from vllm_quarot.cli import main
    from vllm_quarot.eval.zoo import STORIES_HF

    snap = _cache_repo(hf_env, "org/stories", {})
    for f in STORIES_HF.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    monkeypatch.chdir(hf_env)
    out = tmp_path / "q"
    assert main(["quantize", "org/stories", str(out), "--scheme", "w4a4",
                 "--weight-method", "rtn"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quantizer"]["source"] == "org/stories"
    assert main(["quantize", "org/missing", str(tmp_path / "m"), "--scheme", "w4a4",
                 "--weight-method", "rtn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vllm-quarot quantize: error: org/missing is not a local "
                          "directory and not in the Hugging Face cache")
