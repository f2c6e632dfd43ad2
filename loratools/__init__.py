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
    verify_checkpoint(base, adapters, merged, *, weights=None, forward=False) -> VerifyReport
    push(folder, repo_id, *, base_model=None, ...) -> PushResult

Options (``device``, ``precision``, ``dtype`` …) are keywords, checked once into a frozen
:class:`Options`. ``import loratools`` is light: the API is imported on first use.

Inputs are local paths or Hub repo ids (``org/name[@revision][:subfolder]``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all

if TYPE_CHECKING:
    from .adapter import Adapter, LoraModule, delta
    from .deltas import Delta, Full, LowRank
    from .ops.check import verify_checkpoint
    from .options import Options
    from .hub import push
    from .ops.convert import convert
    from .ops.execute import Result
    from .ops.merge import merge, swap, unmerge
    from .ops.stack import extract, resize, stack

# The public API is imported on first use (PEP 562), so that ``import loratools`` and the CLI's
# ``--help`` do not pay for torch.
_LAZY = {
    "Adapter": "adapter", "LoraModule": "adapter", "delta": "adapter", "LowRank": "deltas", "Full": "deltas",
    "Delta": "deltas", "Result": "ops.execute", "convert": "ops.convert", "merge": "ops.merge",
    "unmerge": "ops.merge", "swap": "ops.merge", "stack": "ops.stack", "resize": "ops.stack",
    "extract": "ops.stack", "push": "hub", "verify_checkpoint": "ops.check", "Options": "options",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")


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
    from .options import Options
    from .pipeline import prepare_adapter

    opts = Options.build(layout=layout, from_format=format, allow_skip=allow_skip)
    return prepare_adapter(path, opts, base=base, scale=scale, open_orientation=True)


__all__ = [
    "Adapter", "LoraModule", "Delta", "LowRank", "Full", "delta", "load_adapter", "save_adapter", "convert", "merge",
    "unmerge", "swap", "stack", "resize", "extract", "verify_checkpoint", "push", "Result", "Options", "__version__",
    *_errors_all,
]


def save_adapter(adapter: Adapter, out: str | Path, *, format: str = "peft", overwrite: bool = False) -> list[Path]:
    """Write a (bound) adapter to the folder ``out`` in ``format``, atomically (read back and
    checked like every adapter loratools writes)."""
    from .formats import spec
    from .options import Options
    from .pipeline import check_adapter_out, write_adapter_output

    out = Path(out)
    s = spec(format, writing=True)
    opts = Options.build(overwrite=overwrite)
    check_adapter_out(out, [], opts, command="save_adapter")
    write_adapter_output(adapter, out, opts, to=s.name, operation="save_adapter", sources=[adapter])
    return sorted(out.iterdir()) if out.is_dir() else [out]
