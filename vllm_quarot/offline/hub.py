"""Where the quantizer's MODEL comes from: a local directory or a Hugging Face Hub id.

``resolve_model`` returns a local directory in both cases. A Hub id is fetched with
``huggingface_hub.snapshot_download`` into the Hugging Face cache (``HF_HOME`` /
``HF_HUB_CACHE``, as huggingface_hub reads them), only the files the quantizer reads:
config, safetensors weights and tokenizer. ``HF_HUB_OFFLINE=1`` looks at the cache only.
Every failure is a one-line ``QuantizeError``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from vllm_quarot.offline.options import QuantizeError

log = logging.getLogger("vllm_quarot.quantize")

# what `vllm-quarot quantize` reads from a model repo (and copies into its output)
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "added_tokens.json",
]


def resolve_model(model: str | os.PathLike[str], revision: str | None = None) -> Path:
    """The local directory of MODEL: MODEL itself when it exists on disk, else the
    snapshot of the Hugging Face Hub repo MODEL (``name`` or ``org/name``) at
    ``revision`` (default: the repo's main branch), fetched into the HF cache."""
    path = Path(model)
    name = os.fspath(model)
    if path.exists():
        if not path.is_dir():
            raise QuantizeError(f"{name} is not a directory (MODEL is a model directory "
                                "or a Hugging Face Hub id)")
        if revision is not None:
            raise QuantizeError(f"--revision {revision}: {name} is a local directory; a revision "
                                "applies to a Hugging Face Hub id only")
        return path
    if not _is_repo_id(name):
        raise QuantizeError(f"{name}: no such directory")
    return _snapshot(name, revision)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it (read when it was imported), or as set
    since then."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in {"1", "ON", "YES", "TRUE"}


def _hf_cli() -> str:
    """huggingface_hub's command-line tool: 1.0 renamed `huggingface-cli` to `hf`."""
    import huggingface_hub

    major = huggingface_hub.__version__.split(".")[0]
    return "hf" if not major.isdigit() or int(major) >= 1 else "huggingface-cli"


def _download_command(repo_id: str, revision: str | None) -> str:
    cmd = f"{_hf_cli()} download {repo_id}"
    return f"{cmd} --revision {revision}" if revision is not None else cmd


def _login_command() -> str:
    return "hf auth login" if _hf_cli() == "hf" else "huggingface-cli login"


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport errors of whichever HTTP client huggingface_hub uses (requests up to
    0.x, httpx in 1.x, httpx2 since), as raised when the Hub cannot be reached."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        mod = sys.modules.get(module)  # loaded by huggingface_hub if it is the one it uses
        for attr in names:
            cls = getattr(mod, attr, None) if mod is not None else None
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf_errors

    offline = _offline()
    at = f" (revision {revision})" if revision is not None else ""
    if offline:
        log.info("%s is not a local directory: looking it up%s in the Hugging Face cache %s "
                 "(HF_HUB_OFFLINE=1)", repo_id, at, constants.HF_HUB_CACHE)
    else:
        log.info("%s is not a local directory: fetching it%s from the Hugging Face Hub "
                 "(config, *.safetensors, tokenizer) into %s", repo_id, at,
                 constants.HF_HUB_CACHE)
    download = _download_command(repo_id, revision)
    network = _network_errors()
    incomplete = getattr(hf_errors, "IncompleteSnapshotError", None)
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                   local_files_only=offline)
    except hf_errors.GatedRepoError as e:  # before RepositoryNotFoundError: a subclass of it
        raise QuantizeError(
            f"{repo_id} is a gated repo on the Hugging Face Hub: accept its terms on its page "
            f"and log in (`{_login_command()}` or HF_TOKEN) to download it") from e
    except hf_errors.RepositoryNotFoundError as e:
        raise QuantizeError(
            f"{repo_id}: no such local directory, and no such model repo on the Hugging Face Hub "
            f"(or it is private: log in with `{_login_command()}` or set HF_TOKEN)") from e
    except hf_errors.RevisionNotFoundError as e:
        raise QuantizeError(
            f"{repo_id}: revision {revision or 'main'} not found on the Hugging Face Hub") from e
    except hf_errors.LocalEntryNotFoundError as e:
        if incomplete is not None and isinstance(e, incomplete):
            why = ("HF_HUB_OFFLINE=1" if offline
                   else "the Hugging Face Hub could not be reached")
            raise QuantizeError(
                f"{repo_id}: the cached snapshot{at} is incomplete and {why}: complete it with "
                f"`{download}`") from e
        if offline or isinstance(e.__cause__, getattr(hf_errors, "OfflineModeIsEnabled", ())):
            raise QuantizeError(
                f"{repo_id} is not a local directory and not in the Hugging Face cache "
                f"(HF_HUB_OFFLINE=1): download it first with `{download}` or give a local path"
            ) from e
        cause = e.__cause__ if e.__cause__ is not None else e
        raise QuantizeError(
            f"{repo_id}: no such local directory, and the Hugging Face Hub could not be reached "
            f"({_first_line(cause)}) to fetch it (nor is it in the Hugging Face cache)") from e
    except hf_errors.HfHubHTTPError as e:  # 401, 5xx, disabled repo...
        raise QuantizeError(
            f"{repo_id}: no such local directory, and the Hugging Face Hub answered "
            f"{_first_line(e)}") from e
    except hf_errors.HFValidationError as e:
        raise QuantizeError(f"{repo_id}: {_first_line(e)}") from e
    except network as e:
        raise QuantizeError(
            f"{repo_id}: no such local directory, and the Hugging Face Hub could not be reached "
            f"({_first_line(e)})") from e

    folder = Path(folder)
    source = "the Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the Hugging Face Hub"
    if not any(folder.glob("*.safetensors")):
        hint = f"; or they are not cached: `{download}`" if offline else ""
        raise QuantizeError(
            f"{repo_id}{at} from {source} has no *.safetensors weights: PyTorch .bin "
            f"checkpoints are not read (convert the model to safetensors first{hint})")
    if not (folder / "config.json").is_file():
        raise QuantizeError(f"{repo_id}{at} from {source} has no config.json: "
                            "not a Transformers model repo")
    return folder
