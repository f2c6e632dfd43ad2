"""merge: W' = W + Σ weightᵢ · ΔWᵢ, streamed shard by shard, one rounding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..adapter import Adapter
from ..checkpoint.reader import Checkpoint, open_checkpoint
from ..checkpoint.writer import check_output, parse_size
from ..dtypes import parse_dtype
from ..errors import InvalidArgumentError
from ..formats import read_adapter
from ..layout import bind
from .execute import Progress, Result, execute, resolve_device
from .plan import AdapterInput, Plan, build_plan, collect_ops, file_sha256

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


def load_inputs(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    *,
    weights: Sequence[float] | None,
    layout: str | None,
) -> tuple[Checkpoint, list[AdapterInput]]:
    """Open the base, read and bind every adapter to it."""
    if not adapters:
        raise InvalidArgumentError("At least one adapter is needed.")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise InvalidArgumentError(
            f"{len(weights)} --weight value(s) for {len(adapters)} adapter(s).",
            hint="Give --weight once per adapter, in the same order, or not at all (every weight is then 1).",
        )
    ckpt = open_checkpoint(base)
    read = [a if isinstance(a, Adapter) else read_adapter(a) for a in adapters]
    for adapter in read:  # BASE and ADAPTER the same raw file: its factors are not part of the model
        if adapter.path is not None and Path(adapter.path).resolve() == Path(base).resolve():
            ckpt.drop({k for m in adapter.modules.values() for k in m.source_keys})
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    inputs: list[AdapterInput] = []
    for adapter, w in zip(read, weights):
        bound = bind(adapter, shapes, base_config=ckpt.config, layout=layout)
        label = str(adapter.path) if adapter.path else f"adapter {len(inputs) + 1}"
        inputs.append(AdapterInput(bound, float(w), file_sha256(adapter.files), label))
    return ckpt, inputs


def merge(
    base: str | Path,
    adapters: Sequence[str | Path | Adapter],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    layout: str | None = None,
    device: str | None = "auto",
    dtype: str | torch.dtype | None = None,
    precision: str = "fp32",
    max_shard_size: str | int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: Progress | None = None,
) -> Result:
    """Merge one or more adapters into ``base`` and write ``out``.

    ``base``: a folder (``model.safetensors`` or shards + index) or a ``.safetensors`` file.
    ``adapters``: adapter paths (or already-read :class:`Adapter` objects); ``weights`` one per adapter.
    ``out``: a folder, or a ``.safetensors`` file when ``base`` is one file.
    With ``dry_run`` nothing is written and ``Result.plan`` says what would change. With ``verify``
    (the default) the written files are checked against a float64 reference before they are moved
    into place; ``Result.verify`` holds the report.
    """
    out = Path(out)
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"Unknown precision {precision!r}.", hint="Use fp32 or fp64.")
    compute = PRECISIONS[precision]
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    dev = resolve_device(device)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    input_paths = list(dict.fromkeys([Path(base)] + [Path(a) for a in adapters if not isinstance(a, Adapter)]))
    if not dry_run:
        for p in input_paths:
            if not p.exists():
                break  # open_checkpoint / read_adapter say which input is missing
        else:
            check_output(out, inputs=input_paths, overwrite=overwrite)
    ckpt, inputs = load_inputs(base, adapters, weights=weights, layout=layout)
    single_file = out.suffix == ".safetensors"
    if single_file and not ckpt.is_file:
        raise InvalidArgumentError(
            f"OUT {out} is a .safetensors file, but BASE {base} is a folder.",
            hint="Give a folder as OUT: it receives the weights, index and config files.",
        )
    plan = build_plan(
        "merge",
        ckpt,
        inputs,
        collect_ops(inputs),
        dtype=out_dtype,
        max_shard_size=limit,
        single_file_out=single_file,
    )
    for a in inputs:
        plan.warnings.extend(f"{a.label}: {w}" for w in a.adapter.warnings)
    if dry_run:
        return Result(out=None, warnings=plan.warnings, plan=plan)
    check_output(out, inputs=input_paths, overwrite=overwrite)
    return execute(plan, out, overwrite=overwrite, single_file=single_file, device=dev, dtype=compute,
                   progress=progress, verify=verify)


def describe_plan(plan: Plan) -> list[str]:
    """Human-readable lines for --dry-run."""
    lines = []
    changed = plan.changed()
    for t in changed:
        parts = []
        for op in t.ops:
            label = plan.adapters[op.adapter].label
            what = {"delta": "ΔW", "dora": "DoRA", "bias": "lora bias", "replace": "replaced by"}[op.kind]
            rank = f" r={op.module.rank}" if op.module is not None and op.kind != "bias" else ""
            parts.append(f"{what}{rank} from {label} (weight {op.weight:g})")
        lines.append(f"{t.name}  {list(t.source.shape)} {t.source.dtype}→{t.out_dtype}: " + "; ".join(parts))
    lines.append(
        f"{len(changed)} tensor(s) change, {len(plan.tensors()) - len(changed)} are copied unchanged, "
        f"{len(plan.shards)} file(s), {plan.total_bytes() / 1e6:.1f} MB."
    )
    return lines
