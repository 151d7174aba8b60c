"""Shared fixtures: the shared data folder and small QuaRot checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    # The Triton kernels (the GPU path) run on CPU tensors under Triton's interpreter;
    # it is chosen when kernels are defined, so before anything imports them.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import DATA_DIR, STORIES_HF, make_random_model  # noqa: E402

from vllm_quarot.offline.quantize import QuantizeOptions, quantize  # noqa: E402

TINYSTORIES = DATA_DIR / "tinystories" / "validation_head.txt"
WIKITEXT = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not STORIES_HF.is_dir():
        pytest.skip(f"shared data folder not found at {DATA_DIR} (set QUAROT_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory, shared_data) -> Path:
    return make_random_model(tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture(scope="session")
def quarot_w4a4(tmp_path_factory, random_llama) -> Path:
    """W4A4 (16-bit KV) GPTQ checkpoint of the random Llama, calibrated on TinyStories."""
    out = tmp_path_factory.mktemp("ckpt") / "llama-w4a4"
    quantize(
        random_llama,
        out,
        QuantizeOptions(scheme="w4a4", weight_method="gptq", calib=str(TINYSTORIES),
                        nsamples=8, seqlen=128, verify=True),
    )
    return out
