"""merge, unmerge and swap: W' = W + Σ weightᵢ·ΔWᵢ (and back), streamed shard by shard, one rounding.

These commands differ only in the plan they build (:func:`plan_checkpoint`: provenance checks,
undo data, edits per tensor); ``pipeline.run_checkpoint`` does everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..adapter import Adapter
from ..checkpoint.reader import Checkpoint
from ..errors import InvalidArgumentError, ProvenanceError
from ..options import Options, check_weights
from ..pipeline import AdapterGroup, Planner, run_checkpoint
from .execute import Result
from .plan import AdapterInput, Plan, build_plan, collect_ops
from .undo import read_record, read_undo

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
            if a.weight is None:
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
            if a.weight is None:
                a.weight = 1.0
            continue
        recorded = match.get("weight", 1.0)
        if isinstance(recorded, bool) or not isinstance(recorded, (int, float)):
            raise ProvenanceError(f"{merged}: the loratools record gives {a.label} the weight {recorded!r}, "
                                  "which is not a number.", path=merged,
                                  hint="The record was changed after loratools wrote it; --force with --weight "
                                  "takes the adapter out regardless.")
        recorded = float(recorded)
        if a.weight is None:
            a.weight = recorded
        elif a.weight != recorded and not force:
            raise ProvenanceError(
                f"{a.label} was merged into {merged} with weight {recorded:g}, not {a.weight:g}.",
                path=merged,
                hint="Leave out --weight to use the recorded one, or pass --force.",
            )
        remaining.remove(match)
    return remaining, warnings


def _refuse_reversible_fp8(plan: Plan, options: Options) -> None:
    """--reversible stores the values rounding would not give back; requantizing an FP8 weight
    changes its scales and nearly every code, so what it would store is the weight itself."""
    requantized = [t.name for t in plan.tensors() if t.quant is not None and t.ops and t.out_dtype == t.source.dtype]
    if options.reversible and requantized:
        raise InvalidArgumentError(
            f"--reversible cannot restore FP8 weights bit for bit: {len(requantized)} weight(s) are requantized "
            f"(new block scales, nearly every code changes), e.g. {requantized[0]}.",
            hint="Keep the FP8 base to go back to it; unmerge of an FP8 merge restores it within the "
                 "requantization error (docs/numerics.md).")


def planner(operation: str, options: Options) -> Planner:
    """The plan builder of merge / unmerge / swap for the pipeline."""

    def plan_checkpoint(ckpt: Checkpoint, inputs: list[AdapterInput], merged: Path, base_model: str | None) -> Plan:
        """Provenance, undo data and the plan for one checkpoint (a model, or one pipeline component)."""
        from ..hub import parse_repo

        record = read_record(ckpt)
        undo_in = read_undo(ckpt)
        warnings: list[str] = []
        merged_before = list((record or {}).get("adapters", []))
        remaining = merged_before
        if any(a.sign < 0 for a in inputs):
            remaining, warnings = check_provenance(record, inputs, merged=merged, force=options.force)
        for a in inputs:
            if a.weight is None:
                a.weight = 1.0
        plan = build_plan(operation, ckpt, inputs, collect_ops(inputs, undo_in), dtype=options.torch_output_dtype,
                          max_shard_size=options.max_shard_size)
        _refuse_reversible_fp8(plan, options)
        plan.warnings.extend(warnings)
        plan.merged_after = remaining + [a.record() for a in inputs if a.sign > 0]
        plan.undo_in = undo_in
        # the base model's Hub id, for model cards: the repo it came from, or what its own record says
        name_or_path = ckpt.config.get("_name_or_path")
        plan.base_model = base_model or (record or {}).get("base_model") or (
            name_or_path if isinstance(name_or_path, str) and parse_repo(name_or_path) else None)
        plan.reversible = options.reversible
        plan.output_dtype = options.output_dtype
        if undo_in is not None and undo_in.patches and any(a.sign < 0 for a in inputs):
            same_merge = [(e.get("sha256"), e.get("weight")) for e in undo_in.adapters] == [
                (e.get("sha256"), e.get("weight")) for e in merged_before]
            if options.exact and same_merge and not remaining and not any(a.sign > 0 for a in inputs):
                plan.exact_undo = True
            elif options.exact:
                plan.warnings.append("exact restore needs every merged adapter taken out (and nothing added); the "
                                     "result is within rounding instead")
        for a in inputs:
            plan.warnings.extend(f"{a.label}: {w}" for w in a.adapter.warnings)
        return plan

    return plan_checkpoint


def _run(operation: str, base: str | Path, groups: list[AdapterGroup], out: str | Path, options: Options) -> Result:
    if Path(out).suffix == ".safetensors" and options.max_shard_size is not None:
        raise InvalidArgumentError("--max-shard-size needs a folder as OUT: a single .safetensors file cannot be "
                                   "sharded.")
    return run_checkpoint(base, groups, out, options, planner=planner(operation, options), operation=operation)


def _as_list(adapters: Sequence[str | Path | Adapter] | str | Path | Adapter) -> list[str | Path | Adapter]:
    """One adapter given where a list is expected (``merge(base, "lora", out)``) is a list of one —
    not a string whose characters are read as paths."""
    if isinstance(adapters, (str, Path, Adapter)):
        return [adapters]
    return list(adapters)


def merge(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    **options: object,
) -> Result:
    """Merge adapters into a base model: W' = W + Σ weightᵢ·ΔWᵢ, one rounding per element.

    Options (keywords): ``reversible``, ``device``, ``dtype`` (output), ``precision`` (fp32/fp64),
    ``verify``, ``max_shard_size``, ``dry_run``, ``overwrite``, ``layout``, ``from_format``,
    ``allow_skip``, ``progress``. With ``reversible`` the few values that rounding would not give
    back are stored beside OUT, so that unmerge restores the base bit for bit.
    """
    opts = Options.build(**options)  # type: ignore[arg-type]
    adapters = _as_list(adapters)
    ws = check_weights(weights, len(adapters))
    from .gguf_merge import is_gguf, merge_gguf

    if is_gguf(base):  # a llama.cpp model (ops/gguf_merge.py)
        return merge_gguf(Path(base), adapters, ws, Path(out), opts)
    return _run("merge", base, [AdapterGroup(adapters, ws, 1.0)], out, opts)


def unmerge(
    merged: str | Path,
    adapters: Sequence[str | Path | Adapter],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    **options: object,
) -> Result:
    """Take adapters out of a merged model: W = W' − Σ weightᵢ·ΔWᵢ, one rounding.

    The adapters must be in MERGED's provenance record (``force`` overrides); their weights default
    to the recorded ones. When MERGED was written with ``reversible`` and every merged adapter is
    taken out, the base comes back bit for bit (``exact=False`` declines that).
    """
    opts = Options.build(**options)  # type: ignore[arg-type]
    adapters = _as_list(adapters)
    ws = check_weights(weights, len(adapters), default=None)
    return _run("unmerge", merged, [AdapterGroup(adapters, ws, -1.0)], out, opts)


def swap(
    merged: str | Path,
    old: str | Path | Adapter,
    new: str | Path | Adapter,
    out: str | Path,
    *,
    old_weight: float | None = None,
    weight: float = 1.0,
    **options: object,
) -> Result:
    """Task switch in one pass and one rounding: W'' = W' − old_weight·ΔW_old + weight·ΔW_new."""
    opts = Options.build(**options)  # type: ignore[arg-type]
    (ow,) = check_weights([old_weight], 1) if old_weight is not None else [None]
    (nw,) = check_weights([weight], 1)
    return _run("swap", merged, [AdapterGroup([old], [ow], -1.0), AdapterGroup([new], [nw], 1.0)], out, opts)


def describe_plan(plan: Plan) -> list[str]:
    """Human-readable lines for --dry-run."""
    lines = []
    changed = plan.changed()
    for t in changed:
        parts = [e.describe(plan.adapters[e.adapter].label) for e in t.ops]
        lines.append(f"{t.name}  {list(t.source.shape)} {t.source.dtype}→{t.out_dtype}: " + "; ".join(parts))
    lines.append(
        f"{len(changed)} tensor(s) change, {len(plan.tensors()) - len(changed)} are copied unchanged, "
        f"{len(plan.shards)} file(s), {plan.total_bytes() / 1e6:.1f} MB."
    )
    return lines
