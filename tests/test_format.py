"""The checkpoint format as pydantic models: every field documented, unknown fields
refused at every level, older versions read, one error type with one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_quarot.errors import QuaRotError
from vllm_quarot.format import (
    FORMAT_VERSION,
    CheckpointFormatError,
    QuaRotFormat,
    documented_fields,
)

DOC = Path(__file__).parents[1] / "docs" / "checkpoint-format.md"
GOOD = {"quant_method": "quarot", "format_version": FORMAT_VERSION, "scheme": "w4a4kv4",
        "weight": {"bits": 4}, "activation": {"bits": 4, "clip_ratio": 0.9},
        "kv_cache": {"bits": 4}, "rotation": {"r1": {"seed": 0, "size": 64},
                                              "r3": {"size": 64}}}


def test_every_field_is_documented():
    doc = DOC.read_text()
    missing = [f for f in documented_fields() if f"`{f}`" not in doc]
    assert not missing, f"docs/checkpoint-format.md lacks {missing}"
    assert f"version {FORMAT_VERSION}" in doc.splitlines()[0]


@pytest.mark.parametrize("path", ["colour", "weight.colour", "activation.colour",
                                  "kv_cache.colour", "rotation.colour", "rotation.r1.colour",
                                  "rotation.r3.colour", "lm_head.colour"])
def test_unknown_fields_are_refused_at_every_level(path):
    import copy

    cfg = copy.deepcopy(GOOD)
    cfg["lm_head"] = {"bits": 8}
    node = cfg
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = 1
    with pytest.raises(CheckpointFormatError, match=rf"^malformed quantization_config: "
                       rf"{path}: Extra inputs are not permitted$"):
        QuaRotFormat.from_dict(cfg)


def test_one_error_type_one_line():
    assert issubclass(CheckpointFormatError, QuaRotError)
    assert not issubclass(CheckpointFormatError, ValueError)  # see errors.py
    with pytest.raises(CheckpointFormatError) as e:
        QuaRotFormat.from_dict({**GOOD, "tensor_parallel_blocks": "two"})
    assert "\n" not in str(e.value) and "tensor_parallel_blocks" in str(e.value)


def test_version_1_sections_still_read():
    """A v1 section (no scheme, R3 stored as its size only, no blocks) is read with the
    defaults of its time and written back as the current version."""
    v1 = {"quant_method": "quarot", "format_version": 1, "weight": {"bits": 4},
          "activation": {"bits": 4, "clip_ratio": 0.9}, "kv_cache": {"bits": 4},
          "rotation": {"r1": {"seed": 3, "size": 64}, "r2": {"size": 64},
                       "r3": {"size": 64}}}
    fmt = QuaRotFormat.from_dict(v1)
    assert fmt.scheme == "w4a4kv4" and fmt.tp_blocks == 1 and fmt.lm_head is None
    assert fmt.rotation.r3.factors == (1, 64) and fmt.rotation.r3.layers is None
    out = fmt.to_dict()
    assert out["format_version"] == FORMAT_VERSION and out["rotation"]["r1"]["seed"] == 3
    assert QuaRotFormat.from_dict(out).to_dict() == out


def test_replace_validates():
    fmt = QuaRotFormat.from_dict(GOOD)
    assert fmt.replace(quantizer={"x": 1}).quantizer == {"x": 1}
    with pytest.raises(CheckpointFormatError, match="scheme 'w4a4kv4' means"):
        fmt.replace(kv_cache=None)


def test_kv_cache_pivots():
    """kv_cache.pivots (v6, IntactKV): absent (every older version) reads as 0; a count
    in [0, MAX_KV_PIVOTS] on a 4-bit cache, nothing else."""
    fmt = QuaRotFormat.from_dict(GOOD)
    assert fmt.kv_cache.pivots == 0
    v5 = {**GOOD, "format_version": 5}
    assert QuaRotFormat.from_dict(v5).kv_cache.pivots == 0
    two = {**GOOD, "kv_cache": {"bits": 4, "pivots": 2}}
    assert QuaRotFormat.from_dict(two).to_dict()["kv_cache"]["pivots"] == 2
    for bad, msg in ((9, "must be an integer in \\[0, 8\\]"), (-1, "must be an integer"),
                     (True, "valid integer"), ("2", "valid integer"), (1.5, "valid integer")):
        with pytest.raises(CheckpointFormatError, match=msg):
            QuaRotFormat.from_dict({**GOOD, "kv_cache": {"bits": 4, "pivots": bad}})
    with pytest.raises(CheckpointFormatError, match="pivots is served with 4-bit caches"):
        QuaRotFormat.from_dict({**GOOD, "kv_cache": {"bits": 8, "pivots": 1}})


def test_pivots_are_refused_off_cpu(monkeypatch):
    """Only the CPU KV4 backend keeps pivot tokens at 16 bits: another platform refuses
    a kv_cache.pivots checkpoint in the calling process (one line), not silently."""
    from vllm.platforms import current_platform

    from vllm_quarot.runtime import config

    two = QuaRotFormat.from_dict({**GOOD, "kv_cache": {"bits": 4, "pivots": 2}})
    config._check_pivots_platform(two)  # this CPU: served
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    with pytest.raises(CheckpointFormatError, match="--kv-pivots 0"):
        config._check_pivots_platform(two)
    config._check_pivots_platform(QuaRotFormat.from_dict(GOOD))  # no pivots: nothing
