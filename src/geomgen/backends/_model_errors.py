"""How a model backend reads a failure of its model: out of GPU memory or not,
and the one line of the exception a user sees. Shared by hunyuan3d, sam3d and
the SAM 3 segmenter."""

from __future__ import annotations


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's out-of-memory errors (CUDA or otherwise)."""
    import torch

    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    return isinstance(exc, oom_types) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def first_line(exc: BaseException) -> str:
    """The exception's first line (at most 300 characters), or its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
