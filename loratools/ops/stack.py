"""stack, resize and extract: new adapters made from adapters or from checkpoints.

Each builds the canonical adapter to write (its plan) and hands it to
``pipeline.write_adapter_output``, which writes a PEFT adapter (or ``to=`` another writable format),
reads it back, checks every ΔW and moves it into place; the report gives, per module, the kept
rank and the relative error ‖M − M_R‖_F / ‖M‖_F against the exact combination.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, lowrank_module
from ..deltas import LowRank
from ..errors import InvalidArgumentError, ShapeMismatchError, UnsupportedAdapterError
from ..formats import spec
from ..layout import is_conv1d_target
from ..options import Options, check_weights
from ..pipeline import check_adapter_out, open_base, prepare_adapter, write_adapter_output
from . import algebra

METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


@dataclass
class ModuleReport:
    target: str
    rank: int
    relative_error: float
    note: str = ""


@dataclass
class AdapterResult:
    out: Path | None
    modules: list[ModuleReport] = field(default_factory=list)
    replacements: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _module_seed(seed: int, target: str) -> torch.Generator:
    """One generator per module, independent of module order: seed + crc32(name)."""
    return torch.Generator().manual_seed((seed + zlib.crc32(target.encode())) % (2**63))


def _matrix(m: LoraModule) -> torch.Tensor:
    """ΔW in the canonical (fan_out, fan_in) orientation, float64."""
    return m.delta.matrix(dtype=torch.float64)


def _factors(m: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A), float64, ΔW = B @ A: the delta's own factors, or (ΔW, I) for kinds without any."""
    f = m.delta.factors()
    if f is not None:
        return f
    return _matrix(m), torch.eye(m.fan_in, dtype=torch.float64)


def _check_method(method: str, *, rank: int | None, energy: float | None, density: float | None) -> None:
    if method not in METHODS:
        raise InvalidArgumentError(f"Unknown method {method!r}.", hint=f"Methods: {', '.join(METHODS)}.")
    if method == "cat" and (rank is not None or energy is not None):
        raise InvalidArgumentError("--method cat is exact: its rank is the sum of the ranks; --rank/--energy do not apply.",
                                   hint="Use --method svd to reduce the rank.")
    if method in DENSITY_METHODS:
        if density is None or not 0 < density <= 1:
            raise InvalidArgumentError(f"--method {method} needs --density in (0, 1].")
    elif density is not None:
        raise InvalidArgumentError(f"--density applies to {', '.join(DENSITY_METHODS)}, not {method}.")


def _modules_by_target(read: list[Adapter], ws: list[float]) -> dict[str, list[tuple[LoraModule, float]]]:
    """Every adapter's modules grouped by the base tensor they change (bound names)."""
    targets: dict[str, list[tuple[LoraModule, float]]] = {}
    for a, w in zip(read, ws):
        if a.meta.get("factor_orientation") and any(m.transposed is None for m in a.modules.values()):
            raise UnsupportedAdapterError(
                f"{a.path}: raw factor pairs have no settled orientation; pass --base, or convert them with --base "
                "first.",
                path=a.path,
            )
        if a.meta.get("flat_names"):
            raise UnsupportedAdapterError(
                f"{a.path}: kohya names lose the dots of the module path, so they meet other adapters' names only "
                "through a base model.", path=a.path, hint="Pass --base BASE (the model the adapters were made for).")
        for target, m in a.modules.items():
            if m.kind == "experts":
                raise UnsupportedAdapterError(
                    f"{a.path}: module {target} holds one ΔW per expert of a fused expert tensor; stacking them is "
                    "not supported yet.", tensor=target, hint="Merge the adapters into the base one after another.")
            if not getattr(m.delta, "additive", True):
                raise UnsupportedAdapterError(
                    f"{a.path}: module {target} is a {m.delta.kind} change, a function of the base weight with no ΔW "
                    "of its own: it cannot be stacked or resized.", tensor=target,
                    hint="Merge it into the base instead (loratools merge).")
            if m.magnitude is not None:
                raise UnsupportedAdapterError(
                    f"{a.path}: DoRA module {target} cannot be stacked: its magnitude rescales the whole weight, which "
                    "no sum of deltas expresses.",
                    tensor=target,
                )
            targets.setdefault(target, []).append((m, w))
    for target, parts in targets.items():
        first = parts[0][0]
        for m, _ in parts[1:]:
            if (m.fan_out, m.fan_in, m.kind, m.kernel, bool(m.transposed)) != (
                    first.fan_out, first.fan_in, first.kind, first.kernel, bool(first.transposed)):
                raise ShapeMismatchError(
                    f"{target}: the adapters disagree on its shape or kind "
                    f"({first.kind} {first.fan_out}×{first.fan_in} vs {m.kind} {m.fan_out}×{m.fan_in}).",
                    tensor=target,
                )
    return targets


def _full_tensors(read: list[Adapter], ws: list[float]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The full tensors of the stack: PEFT's copies of base tensors (identical everywhere) and
    modules_to_save, which cannot be combined or weighted."""
    replacements: dict[str, torch.Tensor] = {}
    base_copies: set[str] = set()
    for a, w in zip(read, ws):
        copies = set(a.meta.get("base_copies", ()))
        for name, t in a.replacements.items():
            if name in copies:  # PEFT's copy of the base tensor: the same in every adapter, not weighted
                if name in replacements and not torch.equal(replacements[name], t):
                    raise UnsupportedAdapterError(f"The adapters carry different copies of base tensor {name}.",
                                                  tensor=name)
                replacements[name] = t
                base_copies.add(name)
                continue
            if name in replacements or w != 1.0:
                raise UnsupportedAdapterError(
                    f"Full tensor {name} (modules_to_save) cannot be combined: it comes from several adapters or with "
                    "a weight other than 1.",
                    tensor=name,
                )
            replacements[name] = t
    return replacements, base_copies


def _combine(target: str, parts: list[tuple[LoraModule, float]], method: str, *, rank: int | None,
             energy: float | None, density: float | None, seed: int) -> tuple[algebra.Factors, str]:
    """The factors of Σ wᵢ·ΔWᵢ combined by ``method`` (always in ΔW space, never A and B apart)."""
    factors = [_factors(m) for m, _ in parts]
    total_rank = sum(int(B.shape[1]) for B, _ in factors)
    B_cat, A_cat = algebra.concat([(B, A, w) for (B, A), (_, w) in zip(factors, parts)])
    if method == "cat":
        return algebra.Factors(B_cat, A_cat), ""
    if method in ("svd", "linear"):
        return algebra.factorize_lowrank(B_cat, A_cat, rank=rank or total_rank, energy=energy), ""
    tasks = [_matrix(m) for m, _ in parts]
    w_list = [w for _, w in parts]
    g = _module_seed(seed, target)
    dense = {
        "ties": lambda: algebra.ties(tasks, w_list, density),  # type: ignore[arg-type]
        "magnitude_prune": lambda: algebra.magnitude_prune(tasks, w_list, density),  # type: ignore[arg-type]
        "dare_linear": lambda: algebra.dare_linear(tasks, w_list, density, g),  # type: ignore[arg-type]
        "dare_ties": lambda: algebra.dare_ties(tasks, w_list, density, g),  # type: ignore[arg-type]
    }[method]()
    return algebra.factorize_dense(dense, rank=rank or total_rank, energy=energy, dtype=torch.float64), \
        f"density {density}"


def stack(
    adapters: Sequence[str | Path | Adapter],
    out: str | Path,
    *,
    method: str,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    seed: int = 0,
    to: str = "peft",
    base: str | Path | None = None,
    **options: object,
) -> AdapterResult:
    """One adapter from several: ``cat`` (exact), ``svd``/``linear`` (best rank-R of Σ wᵢΔWᵢ),
    ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (on ΔW, then rank R).

    Every adapter is bound like merge binds it — to ``base`` when given, so that kohya, diffusers
    and PEFT names of the same module meet; without a base, names must already agree."""
    out = Path(out)
    opts = Options.build(**options)  # type: ignore[arg-type]
    spec(to, writing=True)
    _check_method(method, rank=rank, energy=energy, density=density)
    if not adapters:
        raise InvalidArgumentError("stack needs at least one adapter.")
    ws = [float(w) for w in check_weights(weights, len(adapters))]  # type: ignore[arg-type]
    if not opts.dry_run:
        check_adapter_out(out, [*adapters, base], opts, command="stack")
    read = [prepare_adapter(a, opts, base=base, open_orientation=True) for a in adapters]
    result = AdapterResult(out=None if opts.dry_run else out)
    targets = _modules_by_target(read, ws)
    replacements, base_copies = _full_tensors(read, ws)
    modules: dict[str, LoraModule] = {}
    exact: dict[str, algebra.Factors] = {}  # cat: the float64 factors of Σ wᵢ·ΔWᵢ itself
    for n_done, (target, parts) in enumerate(sorted(targets.items()), start=1):
        if opts.progress:
            opts.progress(n_done, len(targets), target)
        first = parts[0][0]
        f, note = _combine(target, parts, method, rank=rank, energy=energy, density=density, seed=seed)
        if method == "cat":
            exact[target] = f
        bias = None
        if any(m.bias is not None for m, _ in parts):
            bias = sum((m.bias.double() * (w * m.bias_factor) for m, w in parts if m.bias is not None),
                       torch.zeros(first.fan_out, dtype=torch.float64))
        dtype = opts.torch_output_dtype or (first.delta.dtype if first.delta.dtype.is_floating_point else torch.float32)
        modules[target] = lowrank_module(
            target, f.A.to(dtype), f.B.to(dtype), 1.0, float(f.rank), kind=first.kind, transposed=first.transposed,
            shape=first.shape, kernel=first.kernel, bias=None if bias is None else bias.to(dtype),
            bias_target=first.bias_target if bias is not None else None,
        )
        result.modules.append(ModuleReport(target, f.rank, f.relative_error, note))
    result.replacements = sorted(replacements)
    adapter = Adapter(modules=modules, replacements=replacements,
                      meta={"format": to, "base_model": next((a.meta.get("base_model") for a in read), None),
                            "config": read[0].meta.get("config", {}), "base_copies": sorted(base_copies)})
    if not opts.dry_run:
        written = write_adapter_output(adapter, out, opts, to=to, operation=f"stack --method {method}",
                                       sources=adapters,
                                       expected=(lambda t: exact[t].B @ exact[t].A) if method == "cat" else None)
        result.warnings = written.notes + result.warnings
    return result


def as_lowrank(m: LoraModule, *, rank: int | None, energy: float | None,
               dtype: torch.dtype | None = None) -> tuple[LoraModule, ModuleReport]:
    """The best plain LoRA of rank ≤ ``rank`` (or holding ``energy`` of ‖ΔW‖²) for one module of any
    kind — Eckart–Young from the delta's exact factors (QR + a small SVD) when it has them, else from
    its ΔW, formed for this module alone — and the report of what it kept."""
    B, A = _factors(m)
    f = algebra.factorize_lowrank(B, A, rank=rank, energy=energy)
    dtype = dtype or (m.delta.dtype if m.delta.dtype.is_floating_point else torch.float32)
    note = f"from rank {m.rank}" if m.delta.kind == "lowrank" else f"from {m.delta.kind}" + (
        f" r={m.rank}" if m.rank is not None else "")
    module = m.with_(delta=LowRank(f.A.to(dtype), f.B.to(dtype), 1.0, float(f.rank)),
                     bias=None if m.bias is None else m.bias * m.bias_factor, bias_scale=None)
    return module, ModuleReport(m.target, f.rank, f.relative_error, note)


def resize(
    adapter: str | Path | Adapter,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    to: str = "peft",
    base: str | Path | None = None,
    **options: object,
) -> AdapterResult:
    """Truncate every module to rank ≤ R (or the smallest rank holding ``energy`` of ‖ΔW‖²); any
    kind (LoHa, LoKr, full) becomes a plain LoRA. ``base`` binds kohya / LyCORIS names."""
    opts = Options.build(**options)  # type: ignore[arg-type]
    spec(to, writing=True)
    if rank is None and energy is None:
        raise InvalidArgumentError("resize needs --rank or --energy.")
    if energy is not None and not 0 < energy <= 1:
        raise InvalidArgumentError("--energy is a fraction in (0, 1].")
    out = Path(out)
    check_adapter_out(out, [adapter, base], opts, command="resize")
    a = prepare_adapter(adapter, opts, base=base, open_orientation=True)
    result = AdapterResult(out=out, warnings=list(a.warnings))
    modules = {}
    for n_done, (target, m) in enumerate(sorted(a.modules.items()), start=1):
        if opts.progress:
            opts.progress(n_done, len(a.modules), target)
        if m.magnitude is not None:
            raise UnsupportedAdapterError(f"DoRA module {target} cannot be resized (its magnitude depends on ΔW).",
                                          tensor=target)
        if not getattr(m.delta, "additive", True):
            raise UnsupportedAdapterError(f"module {target} is a {m.delta.kind} change, a function of the base weight "
                                          "with no ΔW of its own: it cannot be resized.", tensor=target)
        if m.kind == "experts":
            raise UnsupportedAdapterError(f"module {target} holds one ΔW per expert of a fused expert tensor: resizing "
                                          "it is not supported yet.", tensor=target)
        modules[target], report = as_lowrank(m, rank=rank, energy=energy, dtype=opts.torch_output_dtype)
        result.modules.append(report)
    out_adapter = Adapter(modules=modules, replacements=dict(a.replacements), meta=dict(a.meta))
    written = write_adapter_output(out_adapter, out, opts, to=to, operation="resize", sources=[adapter])
    result.warnings = written.notes + result.warnings
    return result


EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
                   "embed_positions", "tok_embeddings", "shared", "embeddings")


def is_embedding(name: str) -> bool:
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return module in EMBEDDING_NAMES


def extract(
    base: str | Path,
    tuned: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: str = "full",
    norms: str = "full",
    to: str = "peft",
    **options: object,
) -> AdapterResult:
    """A LoRA from a fine-tuned checkpoint minus its base: SVD of TUNED − BASE per 2-D tensor
    (float32), streamed tensor pair by tensor pair.

    ``embeddings``: ``full`` (keep changed embeddings as full replacements), ``lora`` (factorize
    them too) or ``skip``. ``norms``: ``full`` or ``skip`` for changed 1-D tensors (norms, biases).
    Unchanged tensors are left out; what was skipped is reported.
    """
    if rank is None and energy is None:
        raise InvalidArgumentError("extract needs --rank or --energy.")
    if embeddings not in ("full", "lora", "skip") or norms not in ("full", "skip"):
        raise InvalidArgumentError("--embeddings is full, lora or skip; --norms is full or skip.")
    opts = Options.build(**options)  # type: ignore[arg-type]
    spec(to, writing=True)
    progress = opts.progress
    out = Path(out)
    check_adapter_out(out, [base, tuned], opts, command="extract")
    b_base, t_base = open_base(base), open_base(tuned)
    if b_base.is_pipeline or t_base.is_pipeline:
        raise InvalidArgumentError("extract works on one model; pass a pipeline's component folders (e.g. BASE/unet).")
    b, t = b_base.parts[""], t_base.parts[""]
    missing = sorted(set(b.tensors) ^ set(t.tensors))
    if missing:
        raise ShapeMismatchError(
            f"BASE and TUNED hold different tensors: {', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}.",
            hint="extract needs the same architecture on both sides.",
        )
    result = AdapterResult(out=out)
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, torch.Tensor] = {}
    names = list(b.tensors)
    for n_done, name in enumerate(names, start=1):
        if progress:
            progress(n_done, len(names), name)
        wb, wt = b.tensors[name], t.tensors[name]
        if wb.shape != wt.shape:
            raise ShapeMismatchError(f"{name}: BASE {wb.shape} vs TUNED {wt.shape}.", tensor=name)
        W, T = b.get(name), t.get(name)
        if W.dtype == T.dtype and torch.equal(W, T):
            continue
        if not T.is_floating_point():
            result.skipped.append(f"{name} (non-float, changed)")
            continue
        D = T.float() - W.float()
        if D.dim() == 1 or D.dim() == 0:
            if norms == "full":
                replacements[name] = T
            else:
                result.skipped.append(f"{name} (1-D)")
            continue
        if D.dim() > 2 and not name.endswith(".weight"):  # fused experts (E, d1, d2): not a conv kernel
            result.skipped.append(f"{name} (fused experts {list(D.shape)}: extracting per-expert LoRA is not "
                                  "supported yet)")
            continue
        emb = is_embedding(name)
        if emb and embeddings != "lora":
            if embeddings == "full":
                replacements[name] = T
            else:
                result.skipped.append(f"{name} (embedding)")
            continue
        transposed = emb or is_conv1d_target(name, b.config)
        kernel = tuple(D.shape[2:]) if D.dim() > 2 else ()
        M = D.T if transposed else D.reshape(D.shape[0], -1)
        f = algebra.factorize_dense(M, rank=rank, energy=energy)
        kind = "embedding" if emb else ("conv" if kernel else "linear")
        dtype = opts.torch_output_dtype or torch.float32
        modules[name] = lowrank_module(name, f.A.to(dtype).contiguous(), f.B.to(dtype).contiguous(), 1.0, float(f.rank),
                                       kind=kind,
                                       transposed=transposed, shape=tuple(D.shape), kernel=kernel)
        result.modules.append(ModuleReport(name, f.rank, f.relative_error,
                                           "randomized SVD" if f.randomized else ""))
    # a module kept whole must be complete (PEFT's modules_to_save loads every parameter of it)
    lora_modules = {n.removesuffix(".weight") for n in modules}
    for name in list(replacements):
        module = name.rpartition(".")[0]
        if module in lora_modules:
            continue
        for sibling in t.tensors:
            if sibling.rpartition(".")[0] == module and sibling not in replacements:
                replacements[sibling] = t.get(sibling)
    result.replacements = sorted(replacements)
    if not modules and not replacements and result.skipped:
        raise InvalidArgumentError(f"nothing to extract: every changed tensor was skipped — "
                                   f"{', '.join(result.skipped[:4])}{' …' if len(result.skipped) > 4 else ''}.")
    if not modules and not replacements:
        raise InvalidArgumentError("TUNED equals BASE in every tensor: there is nothing to extract.")
    adapter = Adapter(modules=modules, replacements=replacements, meta={"format": to, "base_model": None})
    written = write_adapter_output(adapter, out, opts, to=to, operation="extract", sources=[base, tuned])
    result.warnings = written.notes + result.warnings
    return result
