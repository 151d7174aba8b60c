"""The fixes to vLLM (runtime/vllm_patches.py) are applied only where they fit: on the
vLLM version they were written for, on their platform, unless VLLM_QUAROT_PATCHES=0;
another vLLM version gets one warning naming each patch left out. (Each patch's effect
is tested end to end: seeded chunked prefill in test_server_robustness.py, eager PP=2
and the TP refusal in test_parallel.py.)"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import vllm

from vllm_quarot.runtime import vllm_patches


@pytest.fixture
def recorder(monkeypatch):
    """The patch table with each apply() recording instead of patching vLLM."""
    calls: list[str] = []
    table = tuple(dataclasses.replace(p, apply=lambda n=p.name: calls.append(n))
                  for p in vllm_patches.PATCHES)
    monkeypatch.setattr(vllm_patches, "PATCHES", table)
    monkeypatch.setattr(vllm_patches, "_applied", None)
    return calls


def test_cpu_gets_every_patch_once(recorder):
    vllm_patches.apply()
    vllm_patches.apply()  # idempotent
    assert recorder == [p.name for p in vllm_patches.PATCHES]
    assert vllm_patches.applied() == recorder


def test_switched_off(recorder, monkeypatch, caplog):
    monkeypatch.setenv("VLLM_QUAROT_PATCHES", "0")
    vllm_patches.apply()
    assert recorder == [] and vllm_patches.applied() == []


def test_another_vllm_version_is_not_patched_and_says_so(recorder, monkeypatch, caplog):
    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    logger = logging.getLogger("vllm.quarot")
    logger.addHandler(caplog.handler)
    try:
        vllm_patches.apply()
    finally:
        logger.removeHandler(caplog.handler)
    assert recorder == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(set(warnings)) == 1 and "vLLM 0.33.1 is not 0.32" in warnings[0]
    for p in vllm_patches.PATCHES:
        assert p.name in warnings[0]


def test_gpu_gets_only_the_all_platform_patches(recorder, monkeypatch):
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    vllm_patches.apply()
    assert recorder == [p.name for p in vllm_patches.PATCHES if p.platform is None]
