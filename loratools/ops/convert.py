"""convert: rewrite an adapter in another format, keeping every module's ΔW.

The written adapter is read back and each module's ΔW compared with the input's in float64 before
OUT appears (``verify``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..adapter import Adapter, delta
from ..checkpoint.reader import open_checkpoint
from ..checkpoint.writer import AtomicOutput, check_output
from ..dtypes import parse_dtype
from ..errors import InvalidArgumentError, LayoutAmbiguousError, VerificationError
from ..formats import FORMATS, read_adapter
from ..layout import LAYOUTS, bind


@dataclass
class ConvertResult:
    out: Path
    format: str
    modules: int
    max_rel_err: float = 0.0
    warnings: list[str] = field(default_factory=list)


def prepare(
    adapter: str | Path | Adapter,
    *,
    base: str | Path | None = None,
    layout: str | None = None,
    scale: float | None = None,
) -> Adapter:
    """Read and bind an adapter as far as its format needs for writing elsewhere.

    Raw factor files are bound to ``base``, or to themselves when they also hold the weights; a
    factor-only raw file without a base needs ``layout``.
    """
    a = adapter if isinstance(adapter, Adapter) else read_adapter(adapter)
    if scale is not None:
        if a.format != "raw":
            raise InvalidArgumentError(
                f"--scale applies to raw factor files; a {a.format} adapter carries its own scale.",
                hint="Leave out --scale.",
            )
        a = replace(a, modules={n: m.with_(scale=m.scale * scale) for n, m in a.modules.items()})
    if base is None and a.format == "raw" and a.meta.get("base_keys") and a.path is not None:
        base = a.path  # the file holds the module weights too
    if base is not None:
        ckpt = open_checkpoint(base)
        if a.path is not None and Path(a.path).resolve() == Path(base).resolve():
            ckpt.drop({k for m in a.modules.values() for k in m.source_keys})
        return bind(a, {n: t.shape for n, t in ckpt.tensors.items()}, base_config=ckpt.config, layout=layout)
    if layout is not None:
        transposed = {"in-r-out": True}.get(layout, False)
        modules = {n: (m.with_(transposed=transposed) if m.transposed is None else m) for n, m in a.modules.items()}
        a = replace(a, modules=modules)
        return bind(a, {n: m.storage_shape(bool(m.transposed)) for n, m in a.modules.items()}, layout=layout)
    undecided = [n for n, m in a.modules.items() if m.transposed is None and a.meta.get("factor_orientation")]
    if undecided:
        raise LayoutAmbiguousError(
            f"The orientation of {len(undecided)} module(s) cannot be known without the base: "
            f"{', '.join(undecided[:4])}{' …' if len(undecided) > 4 else ''}.",
            hint="Pass --base BASE, or declare --layout (" + ", ".join(LAYOUTS) + ").",
        )
    return a


def max_delta_error(a: Adapter, b: Adapter) -> float:
    """The largest relative difference between the two adapters' ΔW, module by module (float64)."""
    if set(a.modules) != set(b.modules):
        missing = sorted(set(a.modules) ^ set(b.modules))
        raise VerificationError(f"The written adapter's modules differ from the input's: {', '.join(missing[:6])}.")
    worst = 0.0
    for name, m in a.modules.items():
        x = delta(m, dtype=torch.float64)
        y = delta(b.modules[name].with_(shape=m.shape, transposed=m.transposed), dtype=torch.float64)
        denom = float(x.abs().max()) or 1.0
        worst = max(worst, float((x - y).abs().max()) / denom)
    return worst


def convert(
    adapter: str | Path | Adapter,
    out: str | Path,
    *,
    to: str,
    base: str | Path | None = None,
    layout: str | None = None,
    dtype: str | torch.dtype | None = None,
    scale: float | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> ConvertResult:
    """Write ``adapter`` to folder ``out`` in format ``to``; every module's ΔW is kept."""
    out = Path(out)
    if to not in FORMATS or not hasattr(FORMATS[to], "write"):
        writable = [n for n, f in FORMATS.items() if hasattr(f, "write")]
        raise InvalidArgumentError(f"Cannot write format {to!r}.", hint=f"Writable formats: {', '.join(writable)}.")
    inputs = [Path(p) for p in (adapter, base) if p is not None and not isinstance(p, Adapter)]
    check_output(out, inputs=inputs, overwrite=overwrite)
    a = prepare(adapter, base=base, layout=layout, scale=scale)
    target_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if target_dtype is not None:
        a = replace(a, modules={n: m.with_(A=m.A.to(target_dtype), B=m.B.to(target_dtype)) for n, m in a.modules.items()},
                    replacements={n: t.to(target_dtype) for n, t in a.replacements.items()})
    result = ConvertResult(out=out, format=to, modules=len(a.modules), warnings=list(a.warnings))
    atomic = AtomicOutput(out, overwrite=overwrite)
    with atomic as tmp:
        FORMATS[to].write(a, tmp)
        if verify:
            back = FORMATS[to].read(tmp)
            result.max_rel_err = max_delta_error(a, back)
            # the only change allowed is re-expressing the scale (alpha = scale·r): float64 rounding
            if result.max_rel_err > 1e-12:
                raise VerificationError(
                    f"convert: the written {to} adapter does not reproduce the input's ΔW "
                    f"(max relative error {result.max_rel_err:.2e}); nothing was written."
                )
        atomic.commit()
    return result
