"""Reading Hugging Face safetensors checkpoints tensor by tensor, and writing sharded
ones: the quantizer streams a model layer by layer through these."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"


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
                raise FileNotFoundError(
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
            raise KeyError(f"tensor {name!r} is missing from the checkpoint {self.dir}")
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
        save_file(self.pending, self.dir / f".shard-{idx}.safetensors", metadata={"format": "pt"})
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
