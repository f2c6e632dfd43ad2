"""The one owner of the flow: open → bind → plan → write → check → commit.

Every command that writes (merge, unmerge, swap, convert, stack, resize, extract) runs through
here, and ``info`` / ``verify`` run the same open → bind. Commands differ only in the plan they
build, which they pass in:

* checkpoint outputs (:func:`run_checkpoint`): a *planner* turns the bound inputs of one
  checkpoint — a model, or one component of a diffusers pipeline — into a
  :class:`~loratools.ops.plan.Plan`; the pipeline writes every plan (``ops/execute.py``), checks
  the written files against float64 (``verify.py``) and moves the whole output into place;
* adapter outputs (:func:`write_adapter_output`): the command builds the canonical adapter to
  write; the pipeline refuses what the target format cannot hold, writes it, reads it back,
  compares every module's ΔW in float64 with what it should be, and moves it into place.

Nothing is written before every input has been read and bound, and nothing appears at OUT unless
all of it was written and checked (``checkpoint/writer.AtomicOutput``).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from .adapter import Adapter
from .checkpoint.reader import Checkpoint, link_escapes, open_checkpoint
from .checkpoint.writer import AtomicOutput, check_output
from .errors import (InvalidArgumentError, LayoutAmbiguousError, LoraToolsError, OutputExistsError,
                     ShapeMismatchError, UnboundModuleError, VerificationError)
from .formats import check_can_hold, read_adapter, spec
from .hub import parse_repo, resolve
from .layout import bind
from .ops.edits import Compute
from .ops.execute import Result, write_plan
from .ops.plan import AdapterInput, Plan, file_sha256
from .ops.undo import legacy_undo, read_file_record, undo_dir
from .options import LAYOUTS, Options
from .verify import ShardChecker, VerifyReport, verify_written

__all__ = ["Base", "AdapterGroup", "open_base", "bind_groups", "prepare_adapter", "inspect_adapter", "Inspection",
           "run_checkpoint", "write_adapter_output", "commit", "Planner"]

R = TypeVar("R")
AdapterRef = str | Path | Adapter


# --- open --------------------------------------------------------------------------------------------------------


@dataclass
class Base:
    """An opened base: a model (one checkpoint, component ``""``) or a diffusers pipeline folder
    (one checkpoint per component; tensor names qualified as ``<component>.<name>`` for binding)."""

    path: Path
    parts: dict[str, Checkpoint]
    repo_id: str | None = None  # the Hub repo it came from

    @property
    def is_pipeline(self) -> bool:
        return "" not in self.parts

    @property
    def config(self) -> dict:
        return self.parts[""].config if "" in self.parts else {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.qualify(c, n): tuple(t.shape) for c, ck in self.parts.items() for n, t in ck.tensors.items()}

    def qualify(self, component: str, name: str) -> str:
        return f"{component}.{name}" if component else name

    def component_of(self, name: str) -> tuple[str, str]:
        if not self.is_pipeline:
            return "", name
        head, _, rest = name.partition(".")
        return head, rest

    def config_for(self, name: str) -> dict:
        return self.parts[self.component_of(name)[0]].config

    @property
    def bind_config(self) -> Any:
        """What :func:`layout.bind` takes as ``base_config``: the model's config, or per tensor."""
        return self.config_for if self.is_pipeline else self.config

    @property
    def warnings(self) -> list[str]:
        """What opening it left out (links that leave the folder), from every component."""
        return [w for ck in self.parts.values() for w in ck.warnings]


def pipeline_components(folder: Path) -> list[str] | None:
    """The component folders (unet, text_encoder…) of a diffusers pipeline, or None for a model."""
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        return None
    comps = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.suffix in (".safetensors", ".bin") for f in sub.iterdir() if f.is_file()):
            comps.append(sub.name)
    return comps


def open_base(ref: str | Path) -> Base:
    """A local path or Hub id, opened lazily (headers only)."""
    repo = parse_repo(str(ref)) if not Path(ref).exists() else None
    path = Path(resolve(ref, kind="checkpoint"))
    components = pipeline_components(path)
    if components is None:
        return Base(path, {"": open_checkpoint(path)}, repo.repo_id if repo else None)
    return Base(path, {c: open_checkpoint(path / c) for c in components}, repo.repo_id if repo else None)


def read_one(ref: AdapterRef, options: Options, *, base: Base | None = None) -> Adapter:
    if isinstance(ref, Adapter):
        return ref
    path = resolve(ref, kind="adapter")
    return read_adapter(path, format=options.from_format, base_config=base.config if base else None,
                        allow_skip=options.allow_skip)


# --- bind --------------------------------------------------------------------------------------------------------


@dataclass
class AdapterGroup:
    """Adapters applied with one sign: +1 added (merge, the new side of swap), −1 taken out.
    A weight of None is decided by the planner (unmerge: the weight recorded at merge time)."""

    adapters: Sequence[AdapterRef]
    weights: Sequence[float | None]
    sign: float = 1.0


def bind_groups(base: Base, groups: Sequence[AdapterGroup], options: Options) -> dict[str, list[AdapterInput]]:
    """Read every adapter and bind it to ``base``; the inputs of each component that anything
    binds to (``""`` for a model)."""
    if not any(g.adapters for g in groups):
        raise InvalidArgumentError("At least one adapter is needed.")
    read = [[read_one(a, options, base=base) for a in g.adapters] for g in groups]
    if not base.is_pipeline:  # BASE and ADAPTER the same raw file: the factors are not part of the model
        for adapter in (a for g in read for a in g):
            if adapter.path is not None and Path(adapter.path).resolve() == base.path.resolve():
                base.parts[""].drop({k for m in adapter.modules.values() for k in m.source_keys})
    shapes = base.shapes()
    inputs: dict[str, list[AdapterInput]] = {c: [] for c in base.parts}
    count = 0
    for adapters, g in zip(read, groups):
        for ref, adapter, w in zip(g.adapters, adapters, g.weights):
            count += 1
            bound = bind(adapter, shapes, base_config=base.bind_config, layout=options.layout, base=base.path)
            label = str(adapter.path) if adapter.path else f"adapter {count}"
            source = source_name(ref)
            sha = file_sha256(adapter.files)
            for component, part in split_components(bound, base).items():
                ckpt = base.parts[component]
                if g.sign > 0:  # PEFT saves a copy of an embedding beside its LoRA: equal to the base, no change
                    same = [n for n, t in part.replacements.items()
                            if t.dtype == ckpt.tensors[n].torch_dtype and torch.equal(t, ckpt.get(n))]
                    for n in same:
                        del part.replacements[n]
                inputs[component].append(AdapterInput(part, w, sha, label, sign=g.sign, source=source))
    if base.is_pipeline and not any(inputs.values()):
        raise InvalidArgumentError(f"No adapter module binds to any component of {base.path}.")
    return {c: ins for c, ins in inputs.items() if ins or not base.is_pipeline}


def source_name(ref: AdapterRef) -> str:
    """How records written into files name an input: its Hub id, or its file or folder name —
    never a local absolute path (it leaks user names and means nothing on another machine)."""
    if isinstance(ref, Adapter):
        return ref.path.name if ref.path is not None else "in-memory adapter"
    path = Path(ref)
    if path.exists():
        return path.resolve().name
    return str(ref)


def split_components(bound: Adapter, base: Base) -> dict[str, Adapter]:
    """A bound adapter by component, names made relative to it (a model: itself under ``""``)."""
    if not base.is_pipeline:
        return {"": bound}
    parts: dict[str, Adapter] = {}
    for component in base.parts:
        head = component + "."
        modules = {n[len(head):]: m.with_(target=n[len(head):],
                                          bias_target=m.bias_target and m.bias_target[len(head):])
                   for n, m in bound.modules.items() if n.startswith(head)}
        repl = {n[len(head):]: t for n, t in bound.replacements.items() if n.startswith(head)}
        if modules or repl:
            parts[component] = Adapter(modules=modules, replacements=repl, meta=dict(bound.meta),
                                       warnings=list(bound.warnings), path=bound.path, files=bound.files)
    return parts


def prepare_adapter(ref: AdapterRef, options: Options, *, base: str | Path | None = None, scale: float | None = None,
                    open_orientation: bool = False) -> Adapter:
    """Read and bind one adapter as far as writing it elsewhere needs.

    Raw factor files are bound to ``base``, or to themselves when they also hold the weights; a
    factor-only raw file without a base needs ``options.layout`` — unless ``open_orientation``,
    which returns it with its orientation left open (for reading, not writing).
    """
    opened = open_base(base) if base is not None else None
    a = read_one(ref, options, base=opened)
    if scale is not None:
        if a.format != "raw":
            raise InvalidArgumentError(
                f"--scale applies to raw factor files; a {a.format} adapter carries its own scale.",
                hint="Leave out --scale.",
            )
        a = replace(a, modules={n: m.with_(delta=m.delta.scaled(scale)) for n, m in a.modules.items()})
    if opened is None and a.format == "raw" and a.meta.get("base_keys") and a.path is not None:
        opened = open_base(a.path)  # the file holds the module weights too
    if opened is not None:
        # bound like merge binds it; a diffusers pipeline folder against every component at once, the
        # targets keeping their component (unet.…, text_encoder.…), which is how diffusers names them
        if not opened.is_pipeline and a.path is not None and Path(a.path).resolve() == opened.path.resolve():
            opened.parts[""].drop({k for m in a.modules.values() for k in m.source_keys})
        bound = bind(a, opened.shapes(), base_config=opened.bind_config, layout=options.layout, base=opened.path)
        if not opened.is_pipeline:
            bound.meta["base_config"] = opened.config
        bound.warnings = list(bound.warnings) + opened.warnings
        return bound
    if options.layout is not None:
        transposed = {"in-r-out": True}.get(options.layout, False)
        modules = {n: (m.with_(transposed=transposed) if m.transposed is None else m) for n, m in a.modules.items()}
        a = replace(a, modules=modules)
        return bind(a, {n: m.storage_shape(bool(m.transposed)) for n, m in a.modules.items()}, layout=options.layout)
    undecided = [n for n, m in a.modules.items() if m.transposed is None and a.meta.get("factor_orientation")]
    if undecided and not open_orientation:
        raise LayoutAmbiguousError(
            f"The orientation of {len(undecided)} module(s) cannot be known without the base: "
            f"{', '.join(undecided[:4])}{' …' if len(undecided) > 4 else ''}.",
            hint="Pass --base BASE, or declare --layout (" + ", ".join(LAYOUTS) + ").",
        )
    return a


@dataclass
class Inspection:
    """An adapter as ``info`` shows it: bound where it binds, and why the rest does not."""

    adapter: Adapter
    unbound: dict[str, str] = field(default_factory=dict)  # module → why it does not bind


def inspect_adapter(ref: AdapterRef, options: Options, *, base: str | Path | None = None,
                    scale: float | None = None) -> Inspection:
    """open → bind for ``info``: with a base, bind what binds and report the rest module by module."""
    if base is None:
        return Inspection(prepare_adapter(ref, options, scale=scale, open_orientation=True))
    try:
        return Inspection(prepare_adapter(ref, options, base=base, scale=scale))
    except (UnboundModuleError, ShapeMismatchError, LayoutAmbiguousError):
        pass
    opened = open_base(base)
    adapter = read_one(ref, options, base=opened)
    if scale is not None and adapter.format == "raw":
        adapter = replace(adapter, modules={n: m.with_(delta=m.delta.scaled(scale)) for n, m in adapter.modules.items()})
    shapes = opened.shapes()
    bound_modules = {}
    unbound = {}
    parts = [(name, replace(adapter, modules={name: m}, replacements={}), "")
             for name, m in adapter.modules.items()]
    parts += [(name, replace(adapter, modules={}, replacements={name: t}), " (full tensor)")
              for name, t in adapter.replacements.items()]
    for name, one, what in parts:  # module by module: which bind, and why the others do not
        try:
            bound_modules.update(bind(one, shapes, base_config=opened.bind_config, layout=options.layout,
                                      base=opened.path).modules)
        except UnboundModuleError:
            unbound[name] = "no tensor of that name in the base" + what
        except LoraToolsError as e:
            unbound[name] = e.message
    return Inspection(replace(adapter, modules=bound_modules, warnings=list(adapter.warnings) + opened.warnings),
                      unbound)


# --- commit ------------------------------------------------------------------------------------------------------


def commit(out: Path, options: Options, *, write: Callable[[Path], R], single_file: bool = False,
           stale: Sequence[Path] = (), notes: list[str] | None = None) -> R:
    """Run ``write(tmp)`` (which writes and checks) in a temporary folder beside ``out``, then
    move the result into place in one rename; on any failure (SIGTERM and Ctrl-C included)
    nothing appears at ``out``. What an earlier interrupted run left is cleaned up first and said
    in ``notes``."""
    atomic = AtomicOutput(out, overwrite=options.overwrite, single_file=single_file)
    atomic.stale = list(stale)
    with atomic as tmp:
        if notes is not None:
            notes += atomic.notes
        result = write(tmp)
        atomic.commit()
    return result


def forgotten_out(command: str, out: Path) -> str:
    return (f"The last argument is OUT. If {out.name} is meant as an input, add a new OUT after it: "
            f"loratools {command} … {out.name} NEW_OUT.")


def check_adapter_out(out: Path, inputs: Sequence[Any], options: Options, *, command: str) -> None:
    """OUT of a command that writes an adapter: never an input, never a model, and an existing
    adapter is replaced (``--overwrite``) only when loratools wrote it (its record says so) — a
    trained adapter named as OUT by mistake is kept."""
    check_output(out, inputs=_input_paths(inputs), overwrite=options.overwrite, kind="adapter",
                 forgotten_out_hint=forgotten_out(command, out))
    if options.overwrite and out.exists() and read_file_record(out) is None:
        raise OutputExistsError(
            f"OUT {out} is an adapter that loratools did not write; --overwrite replaces only loratools' own outputs.",
            path=out, hint=forgotten_out(command, out) + " Or delete it yourself if it should go.")


def _input_paths(refs: Sequence[Any]) -> list[Path]:
    paths = [Path(p) for p in refs if p is not None and not isinstance(p, Adapter)]
    return list(dict.fromkeys(p for p in paths if p.exists()))


# --- checkpoint outputs ------------------------------------------------------------------------------------------

Planner = Callable[[Checkpoint, list[AdapterInput], Path, str | None], Plan]
"""(checkpoint, its bound inputs, the checkpoint's path, the base's Hub id) → the plan for it."""


def run_checkpoint(base_ref: str | Path, groups: Sequence[AdapterGroup], out: str | Path, options: Options, *,
                   planner: Planner, operation: str) -> Result:
    """open → bind → plan → write → check → commit for merge, unmerge and swap."""
    out = Path(out)
    refs = [base_ref] + [a for g in groups for a in g.adapters]
    paths = _input_paths(refs)
    base = open_base(base_ref)
    expected = {p.name for ck in base.parts.values() for p in ck.extra_files} | {
        s.filename for ck in base.parts.values() for s in ck.shards}

    def check_out() -> None:
        check_output(out, inputs=paths, overwrite=options.overwrite, expected=expected,
                     forgotten_out_hint=forgotten_out(operation, out))

    if not options.dry_run and len(paths) == len([r for r in refs if not isinstance(r, Adapter)]):
        check_out()  # before any adapter is read; else a reader names the missing input
    single_file = out.suffix == ".safetensors"
    if single_file and base.is_pipeline:
        raise InvalidArgumentError(f"{base.path} is a diffusers pipeline folder: OUT must be a folder.")
    if single_file and not base.parts[""].is_file:
        raise InvalidArgumentError(
            f"OUT {out} is a .safetensors file, but {base.path} is a folder.",
            hint="Give a folder as OUT: it receives the weights, index and config files.",
        )
    inputs = bind_groups(base, groups, options)
    plans = {c: planner(base.parts[c], ins, base.path / c if c else base.path, base.repo_id)
             for c, ins in inputs.items()}
    for c, p in plans.items():
        p.warnings[:0] = base.parts[c].warnings
    warnings = [w for p in plans.values() for w in p.warnings]
    if options.dry_run:
        return Result(out=None, warnings=warnings, plan=plans.get(""), plans=plans if base.is_pipeline else None)
    check_out()
    compute = Compute(options.compute_dtype, options.torch_device)

    def write(tmp: Path) -> Result:
        result = Result(out=out, plans=plans if base.is_pipeline else None, plan=plans.get(""))
        report = VerifyReport()
        if base.is_pipeline:
            for entry in sorted(base.path.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.name in plans:
                    _write_one(plans[entry.name], tmp / entry.name, compute, options, result, report,
                               prefix=entry.name + ".")
                elif (escape := link_escapes(entry, base.path)) is not None:
                    result.warnings.append(f"left out {entry.name}: a link to {escape}, outside {base.path}")
                elif entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True,
                                    ignore=lambda d, names: [n for n in names
                                                             if link_escapes(Path(d) / n, base.path) is not None])
                else:
                    shutil.copy2(entry, tmp / entry.name)
        else:
            _write_one(plans[""], tmp, compute, options, result, report, single_name=out.name if single_file else None)
        result.verify = report if options.verify != "none" else None
        return result

    stale = [undo_dir(out, True), legacy_undo(out, True)] if single_file else []
    notes: list[str] = []
    result = commit(out, options, write=write, single_file=single_file, stale=stale, notes=notes)
    result.out = out
    result.warnings = notes + result.warnings
    return result


def _write_one(plan: Plan, folder: Path, compute: Compute, options: Options, result: Result, report: VerifyReport, *,
               single_name: str | None = None, prefix: str = "") -> None:
    """write → check for one checkpoint; the totals go into ``result``."""
    fp64 = compute.dtype == torch.float64
    checker = ShardChecker(plan, fp64=fp64) if options.verify == "sample" else None
    try:
        part, files, ranges = write_plan(plan, folder, compute=compute, single_name=single_name,
                                         progress=options.progress, fingerprints=options.verify != "none",
                                         on_shard=checker)
    except BaseException:
        if checker is not None:
            checker.close()
        raise
    if options.verify != "none":
        if checker is not None:
            checked = checker.report()
        else:
            checked = verify_written(plan, files, fp64=fp64, progress=options.progress, ranges=ranges)
        if not checked.ok:
            raise VerificationError(
                f"{plan.operation}: the written output failed verification; nothing was written. " + checked.summary(),
                hint="This is a bug in loratools or a failing disk; please report it with the command you ran.",
            )
        report.checks += checked.checks
        report.level, report.sample_rows, report.seed = checked.level, checked.sample_rows, checked.seed
        report.bytes_checked += checked.bytes_checked
    result.changed += [prefix + n for n in part.changed]
    result.copied += part.copied
    result.bytes_written += part.bytes_written
    result.undo_bytes += part.undo_bytes
    result.undo_reasons += [r for r in part.undo_reasons if r not in result.undo_reasons]
    result.warnings += part.warnings
    result.notes += part.notes
    result.seconds += part.seconds


# --- adapter outputs ---------------------------------------------------------------------------------------------


def max_delta_error(a: Adapter, b: Adapter, progress: Any = None) -> float:
    """The largest relative difference between the two adapters' ΔW, module by module (float64),
    compared in row blocks so that no full out×in matrix is ever formed."""
    if set(a.modules) != set(b.modules):
        missing = sorted(set(a.modules) ^ set(b.modules))
        raise VerificationError(f"The written adapter's modules differ from the input's: {', '.join(missing[:6])}.")
    worst = 0.0
    for i, (name, m) in enumerate(a.modules.items(), start=1):
        if progress:
            progress(i, len(a.modules), f"verify:{name}")
        other = b.modules[name].with_(shape=m.shape, transposed=m.transposed)
        if not getattr(m.delta, "additive", True):  # W' = f(W): both maps applied to one seeded probe W
            if getattr(other.delta, "additive", True) or other.delta.kind != m.delta.kind:
                raise VerificationError(f"The written adapter's {name} is a {other.delta.kind}, not a {m.delta.kind}.")
            probe = torch.randn(m.stored_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            x = m.delta.apply(probe, out_axis=m.out_axis, weight=1.0)  # type: ignore[attr-defined]
            y = other.delta.apply(probe, out_axis=other.out_axis, weight=1.0)  # type: ignore[attr-defined]
            worst = max(worst, float((x - y).abs().max() / (x.abs().max() or 1.0)))
            continue
        rows = m.stored_shape[0]
        step = max(1, (1 << 20) // max(1, math.prod(m.stored_shape[1:])))
        diff = top = 0.0
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            x = m.block(r0, r1, dtype=torch.float64)
            y = other.block(r0, r1, dtype=torch.float64)
            diff = max(diff, float((x - y).abs().max()) if x.numel() else 0.0)
            top = max(top, float(x.abs().max()) if x.numel() else 0.0)
        worst = max(worst, diff / (top or 1.0))
    return worst


@dataclass
class Written:
    """What :func:`write_adapter_output` did: the largest relative ΔW difference it measured
    reading the output back, and what it cleaned up from an earlier interrupted run."""

    max_rel_err: float
    notes: list[str]


def write_adapter_output(adapter: Adapter, out: str | Path, options: Options, *, to: str, operation: str,
                         sources: Sequence[AdapterRef] = (),
                         expected: Callable[[str], torch.Tensor] | None = None,
                         tolerance: float | None = None, context: dict[str, Any] | None = None) -> Written:
    """write → check → commit an adapter in format ``to``. The written files are read back and
    every module's ΔW compared in float64 with ``expected(target)`` (its canonical (out, in) matrix, when the
    command computed the exact result itself) or with ``adapter``'s own; the largest relative
    difference must stay within ``tolerance`` (default: two ulps of the factors' dtype, the one
    rounding a scale folded into B may cost). Every safetensors file written carries a loratools
    record (operation, inputs by name and sha256) in its metadata."""
    s = spec(to, writing=True)
    check_can_hold(s.name, adapter)
    ctx = dict(context or {})
    module = s.load()

    from . import __version__
    from .ops.plan import file_sha256

    record = {"tool": f"loratools {__version__}", "operation": operation,
              "inputs": [{"path": source_name(r), "sha256": file_sha256(_files_of(r))} for r in sources]}

    out = Path(out)
    single = s.caps.file_suffix is not None and out.suffix == s.caps.file_suffix  # OUT names the file itself
    if single:
        ctx["filename"] = out.name
    from .jsonio import dump_json

    ctx["record"] = dump_json(record)  # each writer keeps it in its own metadata

    def write(tmp: Path) -> float:
        module.write(adapter, tmp, **ctx)
        if options.verify == "none":
            return 0.0
        back = module.read(tmp / out.name if single else tmp, **{k: v for k, v in ctx.items()
                                                               if k not in ("filename", "record")})
        factor_dtype = next((t.dtype for m in adapter.modules.values() for t in m.delta.tensors().values()
                             if t.is_floating_point()), torch.float32)
        if expected is None:
            err = max_delta_error(adapter, back, options.progress)
            limit = tolerance if tolerance is not None else 2 * torch.finfo(factor_dtype).eps
        else:  # the exact result, one module at a time, against factors stored in their dtype
            err = 0.0
            for target in adapter.modules:
                want, got = expected(target), back.modules.get(target)
                diff = float("inf") if got is None else float(
                    (got.delta.matrix(dtype=torch.float64) - want).abs().max())
                err = max(err, diff / (float(want.abs().max()) or 1.0))
            # the rounding of the factors to their dtype (bf16: 2⁻⁸ each) is the only difference allowed
            limit = tolerance if tolerance is not None else max(1e-6, 8 * torch.finfo(factor_dtype).eps)
        if err > limit:
            raise VerificationError(
                f"the written {to} adapter does not reproduce the ΔW it should (max relative error {err:.2e}); "
                "nothing was written.",
                hint="This is a bug in loratools; please report it with the command you ran.",
            )
        return err

    notes: list[str] = []
    err = commit(out, options, write=write, notes=notes, single_file=single)
    return Written(err, notes)


def _files_of(ref: AdapterRef) -> list[Path]:
    if isinstance(ref, Adapter):
        return list(ref.files)
    path = Path(ref)
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []


__all__ += ["max_delta_error", "pipeline_components", "split_components", "read_one"]
