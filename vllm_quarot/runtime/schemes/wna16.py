"""Weight-only: 4/8-bit weights, 16-bit activations (``--scheme w4a16``)."""

from __future__ import annotations

from vllm_quarot.runtime.schemes.base import QuaRotScheme


class QuaRotWnA16(QuaRotScheme):
    pass
