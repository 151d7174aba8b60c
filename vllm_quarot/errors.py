"""The errors vllm-quarot reports to its user: bad input, not bugs.

Every command prints a ``QuaRotError`` as one line (``vllm-quarot CMD: error: ...``,
exit 2); any other exception is a bug and keeps its traceback (exit 1). Deliberately not
a ``ValueError``: vLLM's config classes are pydantic dataclasses, and pydantic turns a
ValueError raised in a config hook (``from_config``, ``maybe_update_config``) into a
multi-line ValidationError that dumps every engine argument; any other exception reaches
``LLM(...)`` / ``vllm serve`` as it is, one line.
"""

from __future__ import annotations


class QuaRotError(Exception):
    """A problem with what the user gave: options, model, data, checkpoint."""


class CheckpointFormatError(QuaRotError):
    """The checkpoint is not a valid vllm-quarot checkpoint: its quantization_config
    (``vllm_quarot.format``) or its tensors (``vllm_quarot.validate``)."""
