"""Carry out a plan: shard by shard, tensor by tensor, computing on the device in float32 (or
float64) and rounding once to the output dtype; untouched tensors are copied byte for byte.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapter import LoraModule, delta, delta_bias
from ..checkpoint.safetensors_io import StreamWriter, read_header
from ..checkpoint.writer import AtomicOutput
from ..dtypes import BY_ST
from ..errors import CorruptFileError, InvalidArgumentError, NonFiniteError, VerificationError
from .plan import Op, Plan, TensorPlan, UndoData
from .undo import RECORD_KEY, UndoSpill, decode_positions, encode_positions, tensor_sha256, undo_name

Progress = Callable[[int, int, str], None]


@dataclass
class Result:
    """What an operation did: where it wrote, what changed, what the user should know."""

    out: Path | None
    changed: list[str] = field(default_factory=list)
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    plan: Plan | None = None
    verify: Any = None  # a verify.VerifyReport when the output was verified
    undo_bytes: int = 0  # size of loratools_undo.safetensors written beside the output
    plans: dict[str, Plan] | None = None  # a diffusers pipeline: one plan per component


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise InvalidArgumentError(f"Unknown device {device!r}.", hint="Use auto, cpu, cuda or cuda:N.") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"--device {device}: no CUDA device is available here.", hint="Use --device cpu.")
    return d


def _out_view(m: LoraModule, ndim: int) -> list[int]:
    view = [1] * ndim
    view[m.dora_axis] = -1
    return view


def dora_apply(W: torch.Tensor, op: Op, *, dtype: torch.dtype, device: torch.device,
               norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm taken per output over everything else (PEFT's DoRA
    merge). ``norms`` receives ‖W + ΔW‖ (float32, one value per output) for undo data."""
    m = op.module
    assert m is not None and m.magnitude is not None
    V = W + delta(m, dtype=dtype, device=device, weight=abs(op.weight))
    dims = tuple(d for d in range(V.dim()) if d != m.dora_axis)
    norm = torch.linalg.vector_norm(V, dim=dims, keepdim=True)
    if norms is not None:
        norms.append(norm.reshape(-1).float().cpu())
    mag = m.magnitude.to(device=device, dtype=dtype)
    return V * (mag.reshape(_out_view(m, V.dim())) / norm)


def dora_undo(W: torch.Tensor, op: Op, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The inverse of :func:`dora_apply` given the stored norms: W = W'·‖W+ΔW‖/m − ΔW."""
    m = op.module
    assert m is not None and m.magnitude is not None and op.tensor is not None
    view = _out_view(m, W.dim())
    factor = op.tensor.to(device=device, dtype=dtype).reshape(view) / m.magnitude.to(device=device, dtype=dtype).reshape(view)
    return W * factor - delta(m, dtype=dtype, device=device, weight=1.0)


def apply_ops(W: torch.Tensor, ops: list[Op], *, dtype: torch.dtype, device: torch.device,
              norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Apply a tensor's ops in order to W (already in the compute dtype on the device)."""
    for op in ops:
        if op.kind == "replace":
            assert op.tensor is not None
            W = op.tensor.to(device=device, dtype=dtype).clone()
        elif op.kind == "delta":
            assert op.module is not None
            W = W + delta(op.module, dtype=dtype, device=device, weight=op.weight)
        elif op.kind == "dora":
            W = dora_apply(W, op, dtype=dtype, device=device, norms=norms)
        elif op.kind == "dora_undo":
            W = dora_undo(W, op, dtype=dtype, device=device)
        elif op.kind == "bias":
            assert op.module is not None
            db = delta_bias(op.module, dtype=dtype, device=device, weight=op.weight)
            assert db is not None
            W = W + db
        else:  # pragma: no cover - plans only hold the kinds above
            raise ValueError(op.kind)
    return W


def inverse_ops(ops: list[Op], *, norm: torch.Tensor | None, original: torch.Tensor) -> list[Op]:
    """The ops unmerge applies to take ``ops`` out again, in the order unmerge applies them
    (collect_ops with every adapter removed): deltas negated in adapter order, DoRA undone with
    its norms, a replaced tensor restored last."""
    inv: list[Op] = []
    restore: list[Op] = []
    for op in ops:
        if op.kind in ("delta", "bias"):
            inv.append(replace(op, weight=-op.weight))
        elif op.kind == "dora":
            inv.append(Op("dora_undo", op.adapter, -abs(op.weight), op.module, tensor=norm))
        elif op.kind == "replace":
            restore.append(Op("replace", op.adapter, -1.0, tensor=original))
    return inv + restore


CHUNK_ELEMENTS = 1 << 22  # rows are processed in blocks of about this many elements


def slice_op(op: Op, i: int, j: int) -> Op:
    """The op restricted to storage rows i:j of its tensor (rows = dim 0 of the stored tensor)."""
    if op.kind == "replace":
        assert op.tensor is not None
        return replace(op, tensor=op.tensor[i:j])
    m = op.module
    assert m is not None
    if op.kind == "dora_undo" and m.dora_axis == 0:
        assert op.tensor is not None
        op = replace(op, tensor=op.tensor[i:j])
    assert m is not None
    if op.kind == "bias":
        assert m.bias is not None
        return replace(op, module=m.with_(bias=m.bias[i:j]))
    shape = m.shape or m.storage_shape(bool(m.transposed))
    new_shape = (j - i, *shape[1:])
    if m.transposed:  # stored (in, out): rows are inputs, columns of A
        return replace(op, module=m.with_(A=m.A[:, i:j], shape=new_shape))
    mag = m.magnitude[i:j] if m.magnitude is not None and m.dora_axis == 0 else m.magnitude
    return replace(op, module=m.with_(B=m.B[i:j], magnitude=mag, shape=new_shape))


def row_blocks(t: TensorPlan, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges to process a tensor in; one block when its ops need whole columns (transposed DoRA)."""
    shape = t.source.shape
    if not shape or any(op.kind in ("dora", "dora_undo") and op.module is not None and op.module.dora_axis != 0
                        for op in t.ops):
        return [(0, shape[0] if shape else 1)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, chunk // per_row)
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [(0, 0)]


def _blocks_apply(src: torch.Tensor, t: TensorPlan, ops: list[Op], *, out_dtype: torch.dtype, dtype: torch.dtype,
                  device: torch.device, operation: str, norms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """ops applied to src in row blocks, each block rounded once to ``out_dtype``."""
    if src.dim() == 0:
        return apply_ops(src.to(device=device, dtype=dtype), ops, dtype=dtype, device=device, norms=norms).to(
            out_dtype).cpu()
    result = torch.empty(src.shape, dtype=out_dtype)
    for i, j in row_blocks(t):
        block_ops = [slice_op(op, i, j) for op in ops]
        W = src[i:j].to(device=device, dtype=dtype)
        block = apply_ops(W, block_ops, dtype=dtype, device=device, norms=norms).to(out_dtype)
        if block.is_floating_point() and not bool(torch.isfinite(block).all()):
            had = "" if bool(torch.isfinite(src[i:j]).all()) else " (the input tensor already held non-finite values)"
            raise NonFiniteError(
                f"{operation} would write NaN or Inf into {t.name}{had}.",
                tensor=t.name,
                hint=f"Check the adapter weights (a weight far too large overflows {BY_ST[t.out_dtype].st}); "
                "nothing was written.",
            )
        result[i:j] = block.cpu()
    return result


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (so −0.0 ≠ 0.0 and NaN payloads count)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.reshape(-1).view(ints) == b.reshape(-1).view(ints)


def compute_tensor(plan: Plan, t: TensorPlan, *, dtype: torch.dtype, device: torch.device,
                   undo_out: UndoData | None = None) -> torch.Tensor:
    """The output value of one planned tensor, rounded once to its output dtype, on the CPU.

    Work is done in row blocks so that temporaries stay small whatever the tensor's size. With
    ``undo_out`` the data to take this change out again is collected there (DoRA norms, replaced
    originals, and with a reversible plan the values that rounding would not give back).
    """
    src = plan.base.get(t.name)
    out_dtype = BY_ST[t.out_dtype].torch
    if not t.ops:
        return src.to(out_dtype)
    norms: list[torch.Tensor] = []
    result = _blocks_apply(src, t, t.ops, out_dtype=out_dtype, dtype=dtype, device=device,
                           operation=plan.operation, norms=norms)
    norm = torch.cat(norms) if norms else None
    if undo_out is not None:
        if norm is not None:
            undo_out.norms[t.name] = norm
        if any(op.kind == "replace" and plan.adapters[op.adapter].sign > 0 for op in t.ops):
            undo_out.originals[t.name] = src
        if plan.reversible and result.dtype == src.dtype:
            back = _blocks_apply(result, t, inverse_ops(t.ops, norm=norm, original=src), out_dtype=src.dtype,
                                 dtype=dtype, device=device, operation=plan.operation)
            differ = ~_same_bits(back, src)
            del back
            if bool(differ.any()):
                undo_out.patches[t.name] = (encode_positions(differ), src.reshape(-1)[differ].clone())
                undo_out.sha256[t.name] = tensor_sha256(src)
    undo_in = plan.undo_in
    if plan.exact_undo and undo_in is not None and t.name in undo_in.patches:
        positions, val = undo_in.patches[t.name]
        result.reshape(-1)[decode_positions(positions, result.numel())] = val.to(result.dtype)
        if tensor_sha256(result) != undo_in.sha256.get(t.name):
            raise VerificationError(
                f"{plan.operation}: {t.name} did not come back bit for bit (its sha256 differs from the one recorded "
                "at merge time); nothing was written.",
                tensor=t.name,
                hint="The arithmetic differs from the merge's (another device or BLAS?). Run unmerge with "
                "--no-exact to accept the rounding-level result (within 1 ulp).",
            )
    return result


def provenance(plan: Plan) -> dict[str, str]:
    """The metadata record every output shard carries: what is merged into this checkpoint now."""
    record = {
        "tool": f"loratools {__version__}",
        "operation": plan.operation,
        "inputs": [dict(a.record(), sign=a.sign) for a in plan.adapters],
        "adapters": plan.merged_after,
        "base_model": plan.base_model,
    }
    return {RECORD_KEY: json.dumps(record, separators=(",", ":"))}


def write_plan(
    plan: Plan,
    folder: Path,
    *,
    single_name: str | None = None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    verify: bool = True,
) -> Result:
    """Write ``plan``'s files into ``folder`` (a temporary folder: nothing here is atomic) and, with
    ``verify``, check them against a float64 reference. ``single_name``: write the one shard under
    this name (a single-file output) and no index or side files."""
    start = time.perf_counter()
    total = plan.total_bytes()
    done = 0
    result = Result(out=folder, warnings=list(plan.warnings), plan=plan)
    meta_extra = provenance(plan)
    undo_out = UndoData(adapters=plan.merged_after)
    folder.mkdir(parents=True, exist_ok=True)
    spill = UndoSpill(folder / ".loratools-undo-parts")
    written: list[tuple[Path, list[TensorPlan]]] = []
    for shard in plan.shards:
        base_meta = {}
        src_header = next((s.header for s in plan.base.shards if s.filename == shard.filename), None)
        if src_header is not None:
            base_meta = dict(src_header.metadata)
        base_meta.setdefault("format", "pt")
        base_meta.update(meta_extra)
        path = folder / (single_name or shard.filename)
        entries = [(t.name, t.out_dtype, t.source.shape) for t in shard.tensors]
        writer = StreamWriter(path, entries, base_meta)
        try:
            for t in shard.tensors:
                if t.copy and t.source.begin >= 0:
                    writer.copy_range(t.name, t.source)
                    result.copied += 1
                else:
                    value = compute_tensor(plan, t, dtype=dtype, device=device, undo_out=undo_out)
                    writer.write_tensor(t.name, value)
                    del value
                    spill.add(undo_out)
                    if t.ops:
                        result.changed.append(t.name)
                    else:
                        result.copied += 1
                done += t.out_nbytes
                if progress:
                    progress(done, total, t.name)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        result.bytes_written += path.stat().st_size
        written.append((path, shard.tensors))
    check_written(written)
    if plan.undo_in is not None:  # keep what later unmerges of the remaining adapters still need
        for name, norm in plan.undo_in.norms.items():
            if name not in result.changed:
                undo_out.norms[name] = norm
        for name, original in plan.undo_in.originals.items():
            if name not in result.changed:
                undo_out.originals[name] = original
        spill.add(undo_out)
    undo_file = folder / (undo_name(Path(single_name), True) if single_name else undo_name(folder, False))
    result.undo_bytes = spill.finish(undo_file, plan.merged_after)
    if verify:
        from ..verify import verify_written

        files = {s.filename: p for s, (p, _) in zip(plan.shards, written)}
        report = verify_written(plan, files, fp64=dtype == torch.float64)
        result.verify = report
        if not report.ok:
            raise VerificationError(
                f"{plan.operation}: the written output failed verification; nothing was written. "
                + report.summary(),
                hint="This is a bug in loratools or a failing disk; please report it with the command you ran.",
            )
    if single_name is None:
        if plan.sharded:
            index = {
                "metadata": {"total_size": plan.total_bytes()},
                "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
            }
            (folder / str(plan.index_name)).write_text(json.dumps(index, indent=2) + "\n")
        for extra in plan.base.extra_files:
            shutil.copy2(extra, folder / extra.name)
    result.seconds = time.perf_counter() - start
    return result


def execute(
    plan: Plan,
    out: Path,
    *,
    overwrite: bool = False,
    single_file: bool = False,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    verify: bool = True,
) -> Result:
    """Write ``plan`` to ``out`` atomically; with ``verify`` the written files are checked against a
    float64 reference (verify.py) before they are moved into place."""
    atomic = AtomicOutput(out, overwrite=overwrite, single_file=single_file)
    if single_file:
        atomic.stale = [out.parent / undo_name(out, True)]
    with atomic as tmp:
        result = write_plan(plan, tmp, single_name=out.name if single_file else None, device=device, dtype=dtype,
                            progress=progress, verify=verify)
        atomic.commit()
    result.out = out
    return result


def check_written(written: list[tuple[Path, list[TensorPlan]]]) -> None:
    """Read every written header back: names, dtypes and shapes must be those planned."""
    for path, tensors in written:
        header = read_header(path)
        want = {t.name: (t.out_dtype, tuple(t.source.shape)) for t in tensors}
        got = {n: (i.dtype, i.shape) for n, i in header.tensors.items()}
        if want != got:
            raise CorruptFileError(f"internal: {path.name} does not hold what was planned; nothing was written.")
