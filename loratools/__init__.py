"""loratools: read, convert, merge and check LoRA adapters exactly, in bounded memory.

Public API::

    load_adapter(path, *, format=None, base=None, layout=None) -> Adapter
    merge(base, adapters, out, *, weights=None, ...) -> Result
    delta(module) -> torch.Tensor          # ΔW of one module in its base tensor's shape
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path

from .adapter import Adapter, LoraModule, delta
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .ops.execute import Result
from .ops.merge import merge


def load_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    base: str | Path | None = None,
    layout: str | None = None,
) -> Adapter:
    """Read an adapter into its canonical form; with ``base``, bind it (targets, shapes, orientation)."""
    from .checkpoint.reader import open_checkpoint
    from .formats import read_adapter
    from .layout import bind

    adapter = read_adapter(path, format=format)
    if base is not None:
        ckpt = open_checkpoint(base)
        adapter = bind(adapter, {n: t.shape for n, t in ckpt.tensors.items()}, base_config=ckpt.config, layout=layout)
    return adapter


__all__ = ["Adapter", "LoraModule", "delta", "load_adapter", "merge", "Result", "__version__", *_errors_all]
