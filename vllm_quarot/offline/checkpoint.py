"""Reading Hugging Face safetensors checkpoints tensor by tensor, and writing sharded
ones: the quantizer streams a model layer by layer through these. The output directory
is staged beside OUT_DIR and renamed into place only once complete (``staged_dir``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_quarot.errors import QuaRotError
from vllm_quarot.offline.options import QuantizeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
log = logging.getLogger("vllm_quarot.quantize")


class MissingTensorError(QuaRotError, KeyError):
    """A tensor the quantizer needs is not in the input checkpoint."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TensorSource:
    """Lazy access to the tensors of a checkpoint directory (single file or sharded)."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / SAFETENSORS_INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.dir / v for k, v in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise QuaRotError(
                    f"{self.dir} holds no *.safetensors weights (PyTorch .bin checkpoints "
                    "are not read: convert them with transformers' save_pretrained first)"
                )
            self.where = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise MissingTensorError(f"tensor {name!r} is missing from the checkpoint {self.dir}")
        f = self.where[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt")
        return self._handles[f].get_tensor(name)  # type: ignore[attr-defined]


class ShardedWriter:
    """Collects tensors and writes model-XXXXX-of-YYYYY.safetensors shards + index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 << 30):
        self.dir = Path(out_dir)
        self.max = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max:
            self._flush()
        self.pending[name] = t.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        save_tensors(self.pending, self.dir / f".shard-{idx}.safetensors")
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, name in enumerate(names):
            (self.dir / f".shard-{i}.safetensors").rename(self.dir / name)
        if n > 1:
            weight_map = {k: names[i] for i, keys in enumerate(self.shards) for k in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        return [self.dir / n for n in names]


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file (format "pt"), the file given the mode any other file of
    this process gets: safetensors writes through a NamedTempFile (mode 0600) that it
    renames into place."""
    save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~process_umask())


def process_umask() -> int:
    """This process's umask, read from /proc where possible (os.umask can only read it
    by changing it, which races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputDirError(QuantizeError):
    """OUT_DIR cannot be written (non-empty without overwrite, not a directory, ...)."""


def check_output_dir(out_dir: Path, overwrite: bool, model_dir: Path | None = None) -> None:
    """Refuse an OUT_DIR that is a file, is (or holds) the input model, or is non-empty
    without ``overwrite``. Cheap: runs before any heavy work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputDirError(f"output {out_dir} exists and is not a directory")
    if model_dir is not None and out_dir.exists():
        src, dst = model_dir.resolve(), out_dir.resolve()
        if src == dst or dst in src.parents:
            raise OutputDirError(f"output {out_dir} is (or holds) the input model {model_dir}")
    if out_dir.is_dir() and not overwrite and any(out_dir.iterdir()):
        raise OutputDirError(f"output directory {out_dir} is not empty "
                             "(give --overwrite to replace it)")


def _stage_name(out_dir: Path, kind: str, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{pid}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_stages(out_dir: Path) -> list[Path]:
    """Delete the .OUT_DIR.tmp-<pid> directories that killed runs (dead pids) left."""
    prefix = f".{out_dir.name}.tmp-"
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        pid = p.name[len(prefix):]
        if (p.name.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid()
                and not _pid_alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _fsync_tree(d: Path) -> None:
    """Flush the staged files and the directory, so the rename publishes their data."""
    for f in d.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(stage: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the complete stage to OUT_DIR; an old non-empty OUT_DIR (overwrite only)
    is moved aside first and deleted after the new one is in place."""
    if out_dir.is_dir() and not out_dir.is_symlink() and any(out_dir.iterdir()):
        if not overwrite:
            raise OutputDirError(f"output directory {out_dir} became non-empty while "
                                 "quantizing (give --overwrite to replace it)")
        old = _stage_name(out_dir, "old", os.getpid())
        os.rename(out_dir, old)
        try:
            os.rename(stage, out_dir)
        except OSError:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old)
    else:
        os.rename(stage, out_dir)  # an empty OUT_DIR is replaced atomically


@contextlib.contextmanager
def staged_dir(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory .OUT_DIR.tmp-<pid> beside OUT_DIR (umask's mode) to write
    into; on success it becomes OUT_DIR, on any error it is deleted. A killed process
    leaves only the hidden stage, which the next run for this OUT_DIR deletes."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(out_dir)
    stage = _stage_name(out_dir, "tmp", os.getpid())
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
        _fsync_tree(stage)
        _publish(stage, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


class RunProgress:
    """The finished parts of one quantizer run (embedding, decoder layers, learned
    rotations), kept in ``.OUT_DIR.partial`` beside OUT_DIR, so that a killed run can be
    continued with ``--resume`` from its last finished layer.

    Each part is a safetensors file of the tensors it writes to the checkpoint, plus the
    state the next part starts from (the calibration hidden states, small JSON state),
    both renamed into place before ``run.json`` lists the part: a part is either finished
    and listed, or redone. ``run.json`` also holds the run's fingerprint (options, model,
    version): a resume with anything different is refused.
    """

    def __init__(self, out_dir: Path, fingerprint: dict, resume: bool):
        """Nothing is read or written until ``open``: a run holds its RunProgress before
        the directory exists, so that an interrupt at any point finds something to
        clean up."""
        self.out_dir, self.resume = out_dir, resume
        self.dir = out_dir.parent / f".{out_dir.name}.partial"
        self.fingerprint = json.loads(json.dumps(fingerprint))  # JSON-normal form
        self.done: list[str] = []
        self.state: dict = {}
        self.opened = False

    def open(self) -> None:
        """Continue the interrupted run's record (``--resume``, same fingerprint), or
        start a new one; a resume with other inputs is refused and keeps the record."""
        if self.dir.exists():
            meta = _read_json(self.dir / "run.json")
            if self.resume and meta is not None and meta.get("fingerprint") == self.fingerprint:
                self.done, self.state = list(meta["done"]), dict(meta.get("state") or {})
                log.info("resuming from %s: %d part(s) finished (%s)", self.dir,
                         len(self.done), self.done[-1] if self.done else "none")
            elif self.resume:
                diff = _fingerprint_diff((meta or {}).get("fingerprint") or {}, self.fingerprint)
                raise QuantizeError(
                    f"--resume: the interrupted run in {self.dir} was made with other "
                    f"inputs ({diff}); run without --resume to start over")
            else:
                n = len((meta or {}).get("done") or [])
                log.warning("found an interrupted run's %d finished part(s) in %s; "
                            "starting over (--resume would continue it)", n, self.dir)
                shutil.rmtree(self.dir)
        elif self.resume:
            log.info("--resume: no interrupted run for %s; starting from the beginning",
                     self.out_dir)
        self.opened = True  # from here on the directory is ours to keep or remove
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_meta()

    def has(self, part: str) -> bool:
        return part in self.done

    def save(self, part: str, tensors: dict[str, torch.Tensor], state: dict,
             state_tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Persist a finished part: its checkpoint tensors, then the state after it."""
        _save_atomic(tensors, self.dir / f"{part}.safetensors")
        if state_tensors:
            _save_atomic(state_tensors, self.dir / f"state-{part}.safetensors")
        previous = self.state.get("tensors")
        self.done.append(part)
        self.state = {**state, "tensors": f"state-{part}.safetensors" if state_tensors
                      else previous}
        self._write_meta()
        if previous and previous != self.state["tensors"]:
            (self.dir / previous).unlink(missing_ok=True)

    def load(self, part: str) -> dict[str, torch.Tensor]:
        return load_file(self.dir / f"{part}.safetensors")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        name = self.state.get("tensors")
        return load_file(self.dir / name) if name else {}

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def close_after_failure(self) -> None:
        """Keep the finished parts of a failed or interrupted run (or remove an empty
        record); say how to continue. Before ``open`` there is nothing to do."""
        if not self.opened:
            return
        if self.done:
            log.warning("kept %d finished part(s) (last: %s) in %s: run the same command "
                        "with --resume to continue", len(self.done), self.done[-1], self.dir)
        else:
            self.remove()

    def _write_meta(self) -> None:
        tmp = self.dir / "run.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done,
                                   "state": self.state}, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "run.json")


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fingerprint_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diff = [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys
            if old.get(k) != new.get(k)]
    return "; ".join(diff[:3]) + ("; ..." if len(diff) > 3 else "") if diff else "unreadable"


def spill_budget_bytes() -> int:
    """Calibration activations larger than this live in disk-backed memory
    (``VLLM_QUAROT_ACT_RAM_GB``; default a quarter of the memory available now)."""
    env = os.environ.get("VLLM_QUAROT_ACT_RAM_GB")
    if env:
        return int(float(env) * 2**30)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


def activation_buffer(shape: tuple[int, ...], dtype: torch.dtype,
                      spill_dir: Path | None) -> torch.Tensor:
    """An uninitialised tensor; above ``spill_budget_bytes`` a memory map of an
    unlinked file in spill_dir (the page cache holds what fits, the disk the rest)."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if spill_dir is None or nbytes <= spill_budget_bytes():
        return torch.empty(shape, dtype=dtype)
    spill_dir.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=spill_dir, suffix=".act")
    try:
        os.ftruncate(fd, nbytes)
        t = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    return t.view(shape)
