"""loratools: read, convert, merge and check LoRA adapters exactly, in bounded memory.

Public API::

    load_adapter(path, *, format=None, base=None, layout=None, scale=None) -> Adapter
    save_adapter(adapter, out, *, format="peft") -> list[Path]
    delta(module) -> torch.Tensor          # ΔW of one module in its base tensor's shape
    merge(base, adapters, out, *, weights=None, reversible=False, ...) -> Result
    unmerge(merged, adapters, out, *, weights=None, force=False, exact=True, ...) -> Result
    swap(merged, old, new, out, *, old_weight=None, weight=1.0, ...) -> Result
    convert(adapter, out, *, to, base=None, layout=None, server=None, ...) -> ConvertResult
    stack(adapters, out, *, method, weights=None, rank=None, ...) -> AdapterResult
    resize(adapter, out, *, rank=None, energy=None) -> AdapterResult
    extract(base, tuned, out, *, rank=None, energy=None, ...) -> AdapterResult
    push(folder, repo_id, *, base_model=None, ...) -> PushResult

Inputs are local paths or Hub repo ids (``org/name[@revision][:subfolder]``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path

from .adapter import Adapter, LoraModule, delta
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .ops.execute import Result
from .ops.convert import convert
from .ops.merge import merge, swap, unmerge
from .ops.stack import extract, resize, stack
from .hub import push


def load_adapter(
    path: str | Path,
    *,
    format: str | None = None,
    base: str | Path | None = None,
    layout: str | None = None,
    scale: float | None = None,
    allow_skip: bool = False,
) -> Adapter:
    """Read an adapter into its canonical form (a local path or a Hub repo id).

    With ``base`` (or, for a raw file that also holds the module weights, by itself) the adapter
    is bound: every module's target tensor, shape and orientation are settled. ``layout`` declares
    the orientation of raw factor pairs; ``scale`` is the multiplier a raw file's code applied. A
    raw file of factors alone keeps its orientation open until a base or layout settles it.
    """
    from .ops.convert import prepare

    return prepare(path, base=base, layout=layout, scale=scale, from_format=format, allow_skip=allow_skip,
                   open_orientation=True)


__all__ = [
    "Adapter", "LoraModule", "delta", "load_adapter", "save_adapter", "convert", "merge", "unmerge", "swap",
    "stack", "resize", "extract", "push", "Result", "__version__", *_errors_all,
]


def save_adapter(adapter: Adapter, out: str | Path, *, format: str = "peft", overwrite: bool = False) -> list[Path]:
    """Write a (bound) adapter to the folder ``out`` in ``format``, atomically."""
    from .checkpoint.writer import AtomicOutput, check_output
    from .errors import InvalidArgumentError
    from .formats import FORMATS

    out = Path(out)
    if format not in FORMATS or not hasattr(FORMATS[format], "write"):
        raise InvalidArgumentError(f"Cannot write format {format!r}.")
    check_output(out, inputs=[], overwrite=overwrite)
    atomic = AtomicOutput(out, overwrite=overwrite)
    with atomic as tmp:
        names = [p.name for p in FORMATS[format].write(adapter, tmp)]
        atomic.commit()
    return [out / n for n in names]
