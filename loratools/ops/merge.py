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
from .plan import AdapterInput, Plan, build_plan, collect_ops, file_sha256
from .undo import read_record, read_undo

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def _weights(adapters: Sequence[object], weights: Sequence[float] | None, flag: str = "--weight") -> list[float | None]:
    if weights is None or len(weights) == 0:
        return [None] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidArgumentError(
            f"{len(weights)} {flag} value(s) for {len(adapters)} adapter(s).",
            hint=f"Give {flag} once per adapter, in the same order, or not at all.",
        )
    return [float(w) for w in weights]


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
    ckpt, inputs = load_inputs(base, groups, layout=layout, from_format=from_format, allow_skip=allow_skip)
    record = read_record(ckpt)
    undo_in = read_undo(ckpt)
    warnings: list[str] = []
    if any(a.sign < 0 for a in inputs):
        merged_before = list((record or {}).get("adapters", []))
        remaining, warnings = check_provenance(record, inputs, merged=Path(base), force=force)
    else:
        merged_before = list((record or {}).get("adapters", []))
        remaining = merged_before
    for a in inputs:
        if a.weight != a.weight:
            a.weight = 1.0
    merged_after = remaining + [a.record() for a in inputs if a.sign > 0]
    single_file = out.suffix == ".safetensors"
    if single_file and not ckpt.is_file:
        raise InvalidArgumentError(
            f"OUT {out} is a .safetensors file, but {base} is a folder.",
            hint="Give a folder as OUT: it receives the weights, index and config files.",
        )
    plan = build_plan(operation, ckpt, inputs, collect_ops(inputs, undo_in), dtype=out_dtype, max_shard_size=limit,
                      single_file_out=single_file)
    plan.warnings.extend(warnings)
    plan.merged_after = merged_after
    plan.undo_in = undo_in
    # the base model's Hub id, for model cards: the repo it came from, or what its own record says
    plan.base_model = base_ref.repo_id if base_ref else (record or {}).get("base_model") or (
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
    if dry_run:
        return Result(out=None, warnings=plan.warnings, plan=plan)
    check_output(out, inputs=input_paths, overwrite=overwrite)
    return execute(plan, out, overwrite=overwrite, single_file=single_file, device=dev, dtype=compute,
                   progress=progress, verify=verify)


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
    ws = [w if w is not None else 1.0 for w in _weights(adapters, weights)]
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
    return run_operation("unmerge", merged, [(adapters, _weights(adapters, weights), -1.0)], out, force=force,
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
