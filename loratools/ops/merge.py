"""merge: W' = W + Σ weightᵢ · ΔWᵢ, streamed shard by shard, one rounding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapter import Adapter
from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..checkpoint.writer import check_output, parse_size
from ..dtypes import parse_dtype
from ..errors import InvalidArgumentError, ProvenanceError
from ..formats import read_adapter
from ..layout import bind
from .execute import Progress, Result, execute, resolve_device
from .plan import AdapterInput, Plan, build_plan, collect_ops, file_sha256, weights_per_adapter
from .undo import read_record, read_undo

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def load_inputs(
    base: str | Path,
    groups: Sequence[tuple[Sequence[str | Path | Adapter], Sequence[float | None], float]],
    *,
    layout: str | None,
    from_format: str | None = None,
    allow_skip: bool = False,
) -> tuple[Checkpoint, list[AdapterInput]]:
    """Open the base, read every adapter and bind it to the base.

    ``groups``: (adapters, weights, sign) — sign −1 for adapters taken out. A weight of ``None``
    is filled in later (1, or for a removal the weight recorded at merge time).
    """
    if not any(g[0] for g in groups):
        raise InvalidArgumentError("At least one adapter is needed.")
    ckpt = open_checkpoint(base)
    read = [[a if isinstance(a, Adapter) else read_adapter(a, format=from_format, base_config=ckpt.config,
                                                             allow_skip=allow_skip) for a in g[0]] for g in groups]
    for adapter in (a for g in read for a in g):  # BASE and ADAPTER the same raw file: factors are not the model
        if adapter.path is not None and Path(adapter.path).resolve() == Path(base).resolve():
            ckpt.drop({k for m in adapter.modules.values() for k in m.source_keys})
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    inputs: list[AdapterInput] = []
    for adapters, (_, weights, sign) in zip(read, groups):
        for adapter, w in zip(adapters, weights):
            bound = bind(adapter, shapes, base_config=ckpt.config, layout=layout)
            # PEFT saves a copy of an embedding beside its LoRA; a "replacement" equal to the base changes nothing
            same = [n for n, t in bound.replacements.items() if sign > 0
                    and t.dtype == ckpt.tensors[n].torch_dtype and torch.equal(t, ckpt.get(n))]
            for n in same:
                del bound.replacements[n]
            label = str(adapter.path) if adapter.path else f"adapter {len(inputs) + 1}"
            weight = float("nan") if w is None else float(w)
            inputs.append(AdapterInput(bound, weight, file_sha256(adapter.files), label, sign=sign))
    return ckpt, inputs


def check_provenance(record: dict | None, inputs: list[AdapterInput], *, merged: Path, force: bool) -> tuple[
        list[dict], list[str]]:
    """Match the adapters being taken out against MERGED's record; fill in their weights.

    Returns (the adapters merged after this operation, warnings). Without --force an adapter that
    the record does not list, or a weight that differs from the recorded one, is refused.
    """
    warnings: list[str] = []
    removing = [a for a in inputs if a.sign < 0]
    if record is None:
        warnings.append(f"{merged} carries no loratools record (merged by another tool?): cannot check that the "
                        "adapters were merged into it")
        for a in removing:
            if a.weight != a.weight:  # NaN: not given
                a.weight = 1.0
        return [], warnings
    remaining = [dict(e) for e in record.get("adapters", [])]
    for a in removing:
        match = next((e for e in remaining if e.get("sha256") == a.sha256), None)
        if match is None:
            if not force:
                held = ", ".join(f"{e.get('path')} (weight {e.get('weight')})" for e in remaining) or "no adapters"
                raise ProvenanceError(
                    f"{a.label} (sha256 {a.sha256[:12]}…) was not merged into {merged}; its record lists {held}.",
                    path=merged,
                    hint="Taking out an adapter that is not in the model would corrupt it. --force overrides the check.",
                )
            warnings.append(f"--force: {a.label} is not in {merged}'s record")
            if a.weight != a.weight:
                a.weight = 1.0
            continue
        recorded = float(match.get("weight", 1.0))
        if a.weight != a.weight:
            a.weight = recorded
        elif a.weight != recorded and not force:
            raise ProvenanceError(
                f"{a.label} was merged into {merged} with weight {recorded:g}, not {a.weight:g}.",
                path=merged,
                hint="Leave out --weight to use the recorded one, or pass --force.",
            )
        remaining.remove(match)
    return remaining, warnings


def make_plan(
    operation: str,
    ckpt: Checkpoint,
    inputs: list[AdapterInput],
    *,
    merged: Path,
    base_model: str | None,
    out_dtype: torch.dtype | None,
    limit: int | None,
    single_file: bool,
    reversible: bool,
    force: bool,
    exact: bool,
) -> Plan:
    """Provenance, undo data and the plan for one checkpoint (a model, or one pipeline component)."""
    from ..hub import parse_repo

    record = read_record(ckpt)
    undo_in = read_undo(ckpt)
    warnings: list[str] = []
    merged_before = list((record or {}).get("adapters", []))
    remaining = merged_before
    if any(a.sign < 0 for a in inputs):
        remaining, warnings = check_provenance(record, inputs, merged=merged, force=force)
    for a in inputs:
        if a.weight != a.weight:
            a.weight = 1.0
    plan = build_plan(operation, ckpt, inputs, collect_ops(inputs, undo_in), dtype=out_dtype, max_shard_size=limit,
                      single_file_out=single_file)
    plan.warnings.extend(warnings)
    plan.merged_after = remaining + [a.record() for a in inputs if a.sign > 0]
    plan.undo_in = undo_in
    # the base model's Hub id, for model cards: the repo it came from, or what its own record says
    plan.base_model = base_model or (record or {}).get("base_model") or (
        ckpt.config.get("_name_or_path") if parse_repo(str(ckpt.config.get("_name_or_path", ""))) else None)
    plan.reversible = reversible
    if undo_in is not None and undo_in.patches and any(a.sign < 0 for a in inputs):
        same_merge = [(e.get("sha256"), e.get("weight")) for e in undo_in.adapters] == [
            (e.get("sha256"), e.get("weight")) for e in merged_before]
        if exact and same_merge and not remaining and not any(a.sign > 0 for a in inputs):
            plan.exact_undo = True
        elif exact:
            plan.warnings.append("exact restore needs every merged adapter taken out (and nothing added); the result "
                                 "is within rounding instead")
    for a in inputs:
        plan.warnings.extend(f"{a.label}: {w}" for w in a.adapter.warnings)
    return plan


def pipeline_components(folder: Path) -> list[str] | None:
    """The component folders (unet, text_encoder…) of a diffusers pipeline, or None for a model."""
    if not folder.is_dir() or not (folder / "model_index.json").is_file():
        return None
    comps = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.suffix in (".safetensors", ".bin") for f in sub.iterdir() if f.is_file()):
            comps.append(sub.name)
    return comps


def run_operation(
    operation: str,
    base: str | Path,
    groups: Sequence[tuple[Sequence[str | Path | Adapter], Sequence[float | None], float]],
    out: str | Path,
    *,
    layout: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    precision: str = "fp32",
    max_shard_size: str | int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    reversible: bool = False,
    force: bool = False,
    exact: bool = True,
    from_format: str | None = None,
    allow_skip: bool = False,
    progress: Progress | None = None,
) -> Result:
    """The one pipeline behind merge, unmerge and swap: bind, plan, execute, verify."""
    from ..hub import parse_repo, resolve

    out = Path(out)
    base_ref = parse_repo(str(base)) if not Path(base).exists() else None
    base = resolve(base, kind="checkpoint")
    groups = [([a if isinstance(a, Adapter) else resolve(a, kind="adapter") for a in g[0]], g[1], g[2]) for g in groups]
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"Unknown precision {precision!r}.", hint="Use fp32 or fp64.")
    compute = PRECISIONS[precision]
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    dev = resolve_device(device)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    paths = [Path(base)] + [Path(a) for g in groups for a in g[0] if not isinstance(a, Adapter)]
    input_paths = list(dict.fromkeys(paths))
    if not dry_run and all(p.exists() for p in input_paths):  # else the readers say which input is missing
        check_output(out, inputs=input_paths, overwrite=overwrite)
    single_file = out.suffix == ".safetensors"
    plan_options = dict(base_model=base_ref.repo_id if base_ref else None, out_dtype=out_dtype, limit=limit,
                        single_file=single_file, reversible=reversible, force=force, exact=exact)
    components = pipeline_components(Path(base))
    if components is not None:
        if single_file:
            raise InvalidArgumentError(f"{base} is a diffusers pipeline folder: OUT must be a folder.")
        plans = pipeline_plans(operation, Path(base), components, groups, layout=layout, from_format=from_format,
                               allow_skip=allow_skip, **plan_options)  # type: ignore[arg-type]
        if dry_run:
            return Result(out=None, warnings=[w for p in plans.values() for w in p.warnings], plans=plans)
        check_output(out, inputs=input_paths, overwrite=overwrite)
        return write_pipeline(Path(base), plans, out, overwrite=overwrite, device=dev, dtype=compute,
                              progress=progress, verify=verify)
    ckpt, inputs = load_inputs(base, groups, layout=layout, from_format=from_format, allow_skip=allow_skip)
    if single_file and not ckpt.is_file:
        raise InvalidArgumentError(
            f"OUT {out} is a .safetensors file, but {base} is a folder.",
            hint="Give a folder as OUT: it receives the weights, index and config files.",
        )
    plan = make_plan(operation, ckpt, inputs, merged=Path(base), **plan_options)  # type: ignore[arg-type]
    if dry_run:
        return Result(out=None, warnings=plan.warnings, plan=plan)
    check_output(out, inputs=input_paths, overwrite=overwrite)
    return execute(plan, out, overwrite=overwrite, single_file=single_file, device=dev, dtype=compute,
                   progress=progress, verify=verify)


def pipeline_plans(
    operation: str,
    base: Path,
    components: list[str],
    groups: Sequence[tuple[Sequence[str | Path | Adapter], Sequence[float | None], float]],
    *,
    layout: str | None,
    from_format: str | None,
    allow_skip: bool,
    **plan_options: object,
) -> dict[str, Plan]:
    """A diffusers pipeline folder: bind every adapter once against all components' tensors named
    ``<component>.<tensor>`` (kohya prefixes and diffusers component prefixes find their component
    that way), then plan each touched component as a checkpoint of its own."""
    ckpts = {c: open_checkpoint(base / c) for c in components}
    shapes = {f"{c}.{n}": t.shape for c, ck in ckpts.items() for n, t in ck.tensors.items()}
    inputs: dict[str, list[AdapterInput]] = {c: [] for c in components}
    for adapters, weights, sign in groups:
        for a, w in zip(adapters, weights):
            adapter = a if isinstance(a, Adapter) else read_adapter(a, format=from_format, allow_skip=allow_skip)
            bound = bind(adapter, shapes, layout=layout)
            label = str(adapter.path) if adapter.path else "adapter"
            sha = file_sha256(adapter.files)
            for c in components:
                head = c + "."
                modules = {n[len(head):]: m.with_(target=n[len(head):], bias_target=m.bias_target and
                                                  m.bias_target[len(head):]) for n, m in bound.modules.items()
                           if n.startswith(head)}
                repl = {n[len(head):]: t for n, t in bound.replacements.items() if n.startswith(head)}
                if modules or repl:
                    part = Adapter(modules=modules, replacements=repl, meta=dict(bound.meta),
                                   warnings=list(bound.warnings), path=bound.path, files=bound.files)
                    weight = float("nan") if w is None else float(w)
                    inputs[c].append(AdapterInput(part, weight, sha, label, sign=sign))
    if not any(inputs.values()):
        raise InvalidArgumentError(f"No adapter module binds to any component of {base}.")
    return {c: make_plan(operation, ckpts[c], ins, merged=base / c, **plan_options)  # type: ignore[arg-type]
            for c, ins in inputs.items() if ins}


def write_pipeline(base: Path, plans: dict[str, Plan], out: Path, *, overwrite: bool, device: torch.device,
                   dtype: torch.dtype, progress: Progress | None, verify: bool) -> Result:
    """Write every planned component with :func:`write_plan`, copy everything else (other
    components, scheduler, tokenizer, model_index.json) as it is, and move the whole folder into
    place at once."""
    import shutil

    from ..checkpoint.writer import AtomicOutput
    from ..verify import VerifyReport
    from .execute import write_plan

    result = Result(out=out, plans=plans)
    report = VerifyReport()
    atomic = AtomicOutput(out, overwrite=overwrite)
    with atomic as tmp:
        for entry in sorted(base.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.name in plans:
                part = write_plan(plans[entry.name], tmp / entry.name, device=device, dtype=dtype,
                                  progress=progress, verify=verify)
                result.changed += [f"{entry.name}.{n}" for n in part.changed]
                result.copied += part.copied
                result.bytes_written += part.bytes_written
                result.undo_bytes += part.undo_bytes
                result.warnings += part.warnings
                if part.verify is not None:
                    report.checks += part.verify.checks
            elif entry.is_dir():
                shutil.copytree(entry, tmp / entry.name)
            else:
                shutil.copy2(entry, tmp / entry.name)
        atomic.commit()
    result.verify = report if verify else None
    return result


def merge(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    reversible: bool = False,
    **options: object,
) -> Result:
    """Merge one or more adapters into ``base`` and write ``out``: W' = W + Σ weightᵢ·ΔWᵢ.

    ``base``: a folder (``model.safetensors`` or shards + index) or a ``.safetensors`` file.
    ``adapters``: adapter paths (or already-read :class:`Adapter` objects); ``weights`` one per adapter.
    ``out``: a folder, or a ``.safetensors`` file when ``base`` is one file.
    Options: ``layout``, ``device`` ("auto"), ``dtype``, ``precision`` ("fp32"|"fp64"),
    ``max_shard_size``, ``dry_run``, ``overwrite``, ``verify`` (True), ``progress``.
    With ``dry_run`` nothing is written and ``Result.plan`` says what would change. With
    ``verify`` the written files are checked against a float64 reference before they are moved
    into place; ``Result.verify`` holds the report. With ``reversible`` the values that
    round(round(W+ΔW) − ΔW) would not give back are stored beside OUT so that unmerge restores
    the base bit for bit.
    """
    ws = weights_per_adapter(adapters, weights)
    return run_operation("merge", base, [(adapters, ws, 1.0)], out, reversible=reversible, **options)  # type: ignore[arg-type]


def unmerge(
    merged: str | Path,
    adapters: Sequence[str | Path | Adapter],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    force: bool = False,
    exact: bool = True,
    **options: object,
) -> Result:
    """Take adapters out of a merged model: W = W' − Σ weightᵢ·ΔWᵢ, one rounding.

    The adapters must be in MERGED's provenance record (``force`` overrides); their weights default
    to the recorded ones. When MERGED was written with ``reversible`` and every merged adapter is
    taken out, the base comes back bit for bit (``exact=False`` declines that).
    """
    return run_operation("unmerge", merged, [(adapters, weights_per_adapter(adapters, weights, default=None), -1.0)], out, force=force,
                         exact=exact, **options)  # type: ignore[arg-type]


def swap(
    merged: str | Path,
    old: str | Path | Adapter,
    new: str | Path | Adapter,
    out: str | Path,
    *,
    old_weight: float | None = None,
    weight: float = 1.0,
    force: bool = False,
    **options: object,
) -> Result:
    """Task switch in one pass and one rounding: W'' = W' − old_weight·ΔW_old + weight·ΔW_new."""
    return run_operation("swap", merged, [([old], [old_weight], -1.0), ([new], [weight], 1.0)], out, force=force,
                         **options)  # type: ignore[arg-type]


def describe_plan(plan: Plan) -> list[str]:
    """Human-readable lines for --dry-run."""
    lines = []
    changed = plan.changed()
    for t in changed:
        parts = []
        for op in t.ops:
            label = plan.adapters[op.adapter].label
            what = {"delta": "ΔW", "dora": "DoRA", "dora_undo": "DoRA taken out", "bias": "lora bias",
                    "replace": "replaced by" if op.weight > 0 else "restored, undoing"}[op.kind]
            rank = f" r={op.module.rank}" if op.module is not None and op.kind != "bias" else ""
            parts.append(f"{what}{rank} from {label} (weight {op.weight:g})")
        lines.append(f"{t.name}  {list(t.source.shape)} {t.source.dtype}→{t.out_dtype}: " + "; ".join(parts))
    lines.append(
        f"{len(changed)} tensor(s) change, {len(plan.tensors()) - len(changed)} are copied unchanged, "
        f"{len(plan.shards)} file(s), {plan.total_bytes() / 1e6:.1f} MB."
    )
    return lines
