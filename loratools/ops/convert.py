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
from ..errors import InvalidArgumentError, LayoutAmbiguousError, UnsupportedAdapterError, VerificationError
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
    from_format: str | None = None,
    allow_skip: bool = False,
    open_orientation: bool = False,
) -> Adapter:
    """Read and bind an adapter as far as its format needs for writing elsewhere.

    Raw factor files are bound to ``base``, or to themselves when they also hold the weights; a
    factor-only raw file without a base needs ``layout`` — unless ``open_orientation``, which
    returns it with its orientation left open (for reading, not writing).
    """
    from ..hub import resolve

    base = resolve(base, kind="checkpoint") if base is not None else None
    adapter = adapter if isinstance(adapter, Adapter) else resolve(adapter, kind="adapter")
    ckpt = open_checkpoint(base) if base is not None else None
    a = adapter if isinstance(adapter, Adapter) else read_adapter(
        adapter, format=from_format, base_config=ckpt.config if ckpt else None, allow_skip=allow_skip)
    if scale is not None:
        if a.format != "raw":
            raise InvalidArgumentError(
                f"--scale applies to raw factor files; a {a.format} adapter carries its own scale.",
                hint="Leave out --scale.",
            )
        a = replace(a, modules={n: m.with_(scale=m.scale * scale) for n, m in a.modules.items()})
    if ckpt is None and a.format == "raw" and a.meta.get("base_keys") and a.path is not None:
        base, ckpt = a.path, open_checkpoint(a.path)  # the file holds the module weights too
    if ckpt is not None:
        if a.path is not None and Path(a.path).resolve() == Path(base).resolve():
            ckpt.drop({k for m in a.modules.values() for k in m.source_keys})
        bound = bind(a, {n: t.shape for n, t in ckpt.tensors.items()}, base_config=ckpt.config, layout=layout)
        bound.meta["base_config"] = ckpt.config
        return bound
    if layout is not None:
        transposed = {"in-r-out": True}.get(layout, False)
        modules = {n: (m.with_(transposed=transposed) if m.transposed is None else m) for n, m in a.modules.items()}
        a = replace(a, modules=modules)
        return bind(a, {n: m.storage_shape(bool(m.transposed)) for n, m in a.modules.items()}, layout=layout)
    undecided = [n for n, m in a.modules.items() if m.transposed is None and a.meta.get("factor_orientation")]
    if undecided and not open_orientation:
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
    from_format: str | None = None,
    allow_skip: bool = False,
    server: str | None = None,
    max_rank: int | None = None,
) -> ConvertResult:
    """Write ``adapter`` to folder ``out`` in format ``to``; every module's ΔW is kept.

    ``server`` ("vllm" or "tgi", with ``to="peft"``) shapes the adapter for what that server
    loads (see :func:`for_server`); ``ConvertResult.warnings`` says what was changed.
    """
    out = Path(out)
    if to not in FORMATS or not hasattr(FORMATS[to], "write"):
        writable = [n for n, f in FORMATS.items() if hasattr(f, "write")]
        raise InvalidArgumentError(f"Cannot write format {to!r}.", hint=f"Writable formats: {', '.join(writable)}.")
    inputs = [Path(p) for p in (adapter, base) if p is not None and not isinstance(p, Adapter) and Path(p).exists()]
    check_output(out, inputs=inputs, overwrite=overwrite)
    a = prepare(adapter, base=base, layout=layout, scale=scale, from_format=from_format, allow_skip=allow_skip)
    notes: list[str] = []
    copies = [n for n in a.meta.get("base_copies", ()) if n in a.replacements]
    if copies and to != "peft":
        # PEFT saves the base's embedding beside an embedding LoRA; it carries nothing of the adapter
        a = replace(a, replacements={n: t for n, t in a.replacements.items() if n not in copies})
        notes.append(f"left out PEFT's copy of the base tensor(s) {', '.join(copies)}: they hold no change")
    if server is not None:
        if to != "peft":
            raise InvalidArgumentError("--for shapes PEFT adapters for a server: use it with --to peft.")
        a, notes = for_server(a, server, max_rank=max_rank)
    target_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if target_dtype is not None:
        a = replace(a, modules={n: m.with_(A=m.A.to(target_dtype), B=m.B.to(target_dtype)) for n, m in a.modules.items()},
                    replacements={n: t.to(target_dtype) for n, t in a.replacements.items()})
    result = ConvertResult(out=out, format=to, modules=len(a.modules), warnings=list(a.warnings) + notes)
    atomic = AtomicOutput(out, overwrite=overwrite)
    context = {"base_config": a.meta.get("base_config")}
    with atomic as tmp:
        FORMATS[to].write(a, tmp, **context)
        if verify:
            back = FORMATS[to].read(tmp, **context)
            result.max_rel_err = max_delta_error(a, back)
            # formats with one global scale or rank fold each module's scale into B: one rounding of B
            # in its own dtype is the only change allowed
            factor_dtype = next((m.B.dtype for m in a.modules.values() if m.B.is_floating_point()), torch.float32)
            if result.max_rel_err > 2 * torch.finfo(factor_dtype).eps:
                raise VerificationError(
                    f"convert: the written {to} adapter does not reproduce the input's ΔW "
                    f"(max relative error {result.max_rel_err:.2e}); nothing was written."
                )
        atomic.commit()
    return result


SERVERS = {"vllm", "tgi"}


def for_server(a: Adapter, server: str, *, max_rank: int | None = None) -> tuple[Adapter, list[str]]:
    """Shape a PEFT adapter for vLLM or TGI/LoRAX, keeping every ΔW exact, and say what changed.

    Both read only ``lora_A`` / ``lora_B`` (and embedding) tensors, one ``r`` and one
    ``lora_alpha`` (``rank_pattern`` / ``alpha_pattern`` are ignored): so smaller ranks are padded
    with zeros to the largest and every module's scale is folded into B with alpha = r. Full
    tensors, DoRA and lora_bias have no form there and are refused. TGI drops a module type that
    some layers lack, so missing (layer, module) pairs get zero factors.
    """
    from ..formats.common import fold_scale, pad_rank

    if server not in SERVERS:
        raise InvalidArgumentError(f"Unknown server {server!r}.", hint=f"Use one of: {', '.join(sorted(SERVERS))}.")
    problems = [f"{n} (full tensor)" for n in a.replacements]
    problems += [f"{n} (DoRA)" for n, m in a.modules.items() if m.magnitude is not None]
    problems += [f"{n} (lora_bias)" for n, m in a.modules.items() if m.bias is not None]
    problems += [f"{n} (conv)" for n, m in a.modules.items() if m.kind == "conv"]
    if problems:
        raise UnsupportedAdapterError(
            f"{server} cannot load: {', '.join(problems[:6])}{' …' if len(problems) > 6 else ''}.",
            hint="Merge those parts into the base model instead, or serve the merged model.")
    rank = max(m.rank for m in a.modules.values())
    if max_rank is not None and rank > max_rank:
        raise UnsupportedAdapterError(f"The adapter's rank {rank} exceeds --max-rank {max_rank}.",
                                      hint=f"loratools resize ADAPTER OUT --rank {max_rank} makes a smaller one first.")
    notes = []
    padded = sorted(n for n, m in a.modules.items() if m.rank < rank)
    rescaled = sorted(n for n, m in a.modules.items() if m.scale != 1.0)
    modules = {n: pad_rank(fold_scale(m, 1.0), rank).with_(alpha=float(rank)) for n, m in a.modules.items()}
    # scale 1 = alpha / r with alpha = r: one global alpha, folded per module
    modules = {n: m.with_(scale=1.0) for n, m in modules.items()}
    if rescaled:
        notes.append(f"{server}: folded the scale of {len(rescaled)} module(s) into lora_B; lora_alpha = r = {rank}")
    if padded:
        notes.append(f"{server}: padded {len(padded)} module(s) with zero rank to r = {rank}")
    if server == "tgi":
        import re

        layered = {}
        for n in modules:
            match = re.match(r"^(.*\.layers\.)(\d+)(\..*)$", n)
            if match:
                layered.setdefault(match.group(3), set()).add((match.group(1), int(match.group(2))))
        layers = {(p, i) for v in layered.values() for p, i in v}
        added = 0
        for suffix, present in layered.items():
            template = next(m for n, m in modules.items() if n.endswith(suffix) and ".layers." in n)
            for prefix, i in sorted(layers - present):
                name = f"{prefix}{i}{suffix}"
                modules[name] = template.with_(target=name, A=torch.zeros_like(template.A),
                                               B=torch.zeros_like(template.B), source_keys=())
                added += 1
        if added:
            notes.append(f"tgi: added {added} zero module(s) so that every layer carries every module type")
    return replace(a, modules=modules), notes


@dataclass
class Inspection:
    """An adapter as ``info`` shows it: bound where it binds, and why the rest does not."""

    adapter: Adapter
    unbound: dict[str, str] = field(default_factory=dict)  # module → why it does not bind


def inspect(
    path: str | Path,
    *,
    base: str | Path | None = None,
    layout: str | None = None,
    scale: float | None = None,
    from_format: str | None = None,
    allow_skip: bool = False,
) -> Inspection:
    """Read an adapter; with a base, bind what binds and report the rest module by module."""
    from ..errors import LoraToolsError, ShapeMismatchError, UnboundModuleError
    from ..hub import resolve

    path = resolve(path, kind="adapter")
    base = resolve(base) if base is not None else None
    if base is None:
        return Inspection(prepare(path, layout=layout, scale=scale, from_format=from_format, allow_skip=allow_skip,
                                  open_orientation=True))
    try:
        return Inspection(prepare(path, base=base, layout=layout, scale=scale, from_format=from_format,
                                  allow_skip=allow_skip))
    except (UnboundModuleError, ShapeMismatchError, LayoutAmbiguousError):
        pass
    # bind module by module to say which ones do not, and why
    ckpt = open_checkpoint(base)
    adapter = read_adapter(path, format=from_format, base_config=ckpt.config, allow_skip=allow_skip)
    if scale is not None and adapter.format == "raw":
        adapter = replace(adapter, modules={n: m.with_(scale=m.scale * scale) for n, m in adapter.modules.items()})
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    bound_modules = {}
    unbound = {}
    for name, m in adapter.modules.items():
        try:
            one = bind(replace(adapter, modules={name: m}, replacements={}), shapes, base_config=ckpt.config,
                       layout=layout)
            bound_modules.update(one.modules)
        except UnboundModuleError:
            unbound[name] = "no tensor of that name in the base"
        except LoraToolsError as e:
            unbound[name] = e.message
    for name, t in adapter.replacements.items():
        try:
            bind(replace(adapter, modules={}, replacements={name: t}), shapes, base_config=ckpt.config)
        except UnboundModuleError:
            unbound[name] = "no tensor of that name in the base (full tensor)"
        except LoraToolsError as e:
            unbound[name] = e.message
    return Inspection(replace(adapter, modules=bound_modules), unbound)
