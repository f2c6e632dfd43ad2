"""Carry out a plan: shard by shard, tensor by tensor, computing on the device in float32 (or
float64) and rounding once to the output dtype; untouched tensors are copied byte for byte.

This writes files into a folder it is given and nothing else: checking them and moving them into
place is the pipeline's (``loratools/pipeline.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..checkpoint.safetensors_io import StreamWriter, read_header
from ..checkpoint.stream import BUFFER_BYTES, Range
from ..dtypes import BY_ST
from ..errors import InternalError, NonFiniteError, VerificationError
from . import fp8, kernels
from .edits import CHUNK_ELEMENTS, AddBias, AddDelta, Compute, Dora, Edit, apply_edits, inverse_edits, row_blocks
from .plan import Plan, ShardPlan, TensorPlan, UndoData
from .undo import (KERNEL, UNDO_NAME, RECORD_KEY, UndoSpill, decode_positions, encode_indices, encode_positions, tensor_sha256,
                   undo_dir)

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
    undo_bytes: int = 0  # size of the undo data kept with the output (.loratools/undo.safetensors)
    undo_reasons: list[str] = field(default_factory=list)  # why it was kept
    notes: list[str] = field(default_factory=list)  # what the user should know that is not a warning (FP8 requantization)
    adapter_count: int | None = None  # when there is no plan to count them in (a GGUF model)
    plans: dict[str, Plan] | None = None  # a diffusers pipeline: one plan per component


def _blocks_apply(src: torch.Tensor, t: TensorPlan, edits: list[Edit], *, out_dtype: torch.dtype, c: Compute,
                  operation: str) -> torch.Tensor:
    """``edits`` applied to src in row blocks, each block rounded once to ``out_dtype``."""
    if src.dim() == 0:
        return apply_edits(src.to(device=c.device, dtype=c.dtype), edits, c).to(out_dtype).cpu()
    result = torch.empty(src.shape, dtype=out_dtype)
    limit = kernels.finite_limit(out_dtype) if out_dtype.is_floating_point and out_dtype.itemsize == 1 else None
    for i, j in row_blocks(tuple(src.shape), edits):
        W = src[i:j].to(device=c.device, dtype=c.dtype)
        exact = apply_edits(W, [e.slice(i, j) for e in edits], c)
        if limit is not None and exact.numel() and not kernels.in_range(exact, limit):  # fp8 would saturate
            raise _non_finite(operation, t, src[i:j])
        block = exact.to(out_dtype)
        if block.is_floating_point() and not _finite(block):
            raise _non_finite(operation, t, src[i:j])
        result[i:j] = block.cpu()
    return result


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bit equality (so −0.0 ≠ 0.0 and NaN payloads count)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.reshape(-1).view(ints) == b.reshape(-1).view(ints)


SWAMP = 10.0  # ‖Σ wᵢΔWᵢ‖ beyond this many times ‖W‖ is worth a warning


def swamp_warning(t: TensorPlan, src: torch.Tensor, *, first_rows: int = 0) -> str | None:
    """A warning when the deltas added to a tensor outweigh it many times over (a weight of 1e4
    typed for 1e-4): the merge is exact, but the model is likely no longer the base's. With
    ``first_rows``, ‖W‖ is estimated from the tensor's first rows (the block about to be read
    anyway: no pass over the whole tensor, no scattered reads)."""
    deltas = [e for e in t.ops if isinstance(e, AddDelta) and not isinstance(e, (Dora, AddBias))]
    if not deltas or src.dim() == 0 or not src.is_floating_point():
        return None
    if 0 < first_rows < src.shape[0]:
        head = float(torch.linalg.vector_norm(src[:first_rows], dtype=torch.float32))
        base = head * math.sqrt(src.shape[0] / first_rows)
        # ‖ΔW‖ ≤ |s|·‖B‖·‖A‖ is cheap, and most adapters are far below the threshold by it
        if sum(abs(e.weight) * _norm_bound(e.module) for e in deltas if e.module is not None) <= SWAMP * base:
            return None
    else:
        base = float(torch.linalg.vector_norm(src.double()))
    added = sum(abs(e.weight) * e.module.delta.norm() for e in deltas if e.module is not None)
    if added == 0:
        return None
    if added > SWAMP * max(base, 1e-30):
        return (f"{t.name}: the weighted ΔW is {added / max(base, 1e-30):.3g}× the size of the base tensor "
                "(‖wΔW‖/‖W‖); at these weights the adapter swamps the base — check --weight")
    return None


def _norm_bound(m: Any) -> float:
    """An upper bound on ‖ΔW‖_F: |s|·‖B‖·‖A‖ for low-rank deltas, the exact norm otherwise."""
    stored = m.stored_factors()
    if stored is None:
        return m.delta.norm()
    L, R, scale = stored
    return abs(scale) * float(torch.linalg.vector_norm(L.float())) * float(torch.linalg.vector_norm(R.float()))


def compute_tensor(plan: Plan, t: TensorPlan, *, compute: Compute,
                   undo_out: UndoData | None = None, warnings: list[str] | None = None) -> torch.Tensor:
    """The output value of one planned tensor, rounded once to its output dtype, on the CPU.

    Work is done in row blocks so that temporaries stay small whatever the tensor's size. With
    ``undo_out`` the data to take this change out again is collected there (DoRA norms, replaced
    originals, and with a reversible plan the values that rounding would not give back).
    """
    src = plan.base.get(t.name)
    out_dtype = BY_ST[t.out_dtype].torch
    if not t.ops:  # a cast (--dtype): one rounding, which must not overflow
        value = src.to(out_dtype)
        if value.is_floating_point() and not _finite(value) and _finite(src):
            raise NonFiniteError(
                f"{plan.operation}: casting {t.name} from {t.source.dtype} to {t.out_dtype} overflows (values beyond "
                f"{t.out_dtype}'s range become Inf); nothing was written.",
                tensor=t.name, hint="Choose a wider --dtype (bf16 keeps float32's range), or leave out --dtype.")
        return value
    if warnings is not None and (note := swamp_warning(t, src)):
        warnings.append(note)
    norms: list[torch.Tensor] = []
    c = Compute(compute.dtype, compute.device, norms)
    result = _blocks_apply(src, t, t.ops, out_dtype=out_dtype, c=c, operation=plan.operation)
    norm = torch.cat(norms) if norms else None
    if undo_out is not None:
        if norm is not None:
            undo_out.norms[t.name] = norm
        if any(e.replaces and plan.adapters[e.adapter].sign > 0 for e in t.ops):
            undo_out.originals[t.name] = src
        if plan.reversible and result.dtype == src.dtype:
            back = _blocks_apply(result, t, inverse_edits(t.ops, norm=norm, original=src), out_dtype=src.dtype,
                                 c=Compute(compute.dtype, compute.device), operation=plan.operation)
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
            raise _not_restored(plan, t)
    return result


def _non_finite(operation: str, t: TensorPlan, src_block: torch.Tensor) -> NonFiniteError:
    had = "" if _finite(src_block) else " (the input tensor already held non-finite values)"
    out = BY_ST[t.out_dtype]
    what = "NaN or Inf"
    if out.torch is not None and out.torch.is_floating_point and out.itemsize == 1 and not had:
        top = torch.finfo(out.torch).max
        what = f"values beyond ±{top:g}, the largest {out.st} holds (torch would clip them silently)"
    return NonFiniteError(
        f"{operation} would write {what} into {t.name} (from {t.source.file.name}){had}.",
        tensor=t.name,
        hint=f"Check the adapter weights (a weight far too large overflows {BY_ST[t.out_dtype].st}); "
        "nothing was written.",
    )


def emit_tensor(plan: Plan, t: TensorPlan, writer: StreamWriter, *, compute: Compute,
                undo_out: UndoData | None = None, warnings: list[str] | None = None) -> None:
    """Compute one planned tensor and write it: through the kernel (``ops/kernels.py``) when its
    edits are plain low-rank deltas or a cast, else whole through :func:`compute_tensor`."""
    out_dtype = BY_ST[t.out_dtype].torch
    if t.quant is not None or t.scale_of is not None:
        _emit_quantized(plan, t, writer, compute=compute)
        return
    if t.source.begin >= 0 and out_dtype is not None:
        with plan.base.view(t.name) as src:
            row_bytes = src.numel() // max(src.shape[0], 1) * BY_ST[t.out_dtype].itemsize if src.dim() else 0
            fast = kernels.fits(src, out_dtype, compute) and row_bytes <= BUFFER_BYTES
            terms = kernels.lowrank_terms(t.ops, compute) if fast else None
            if terms is not None:
                _emit_blocks(plan, t, src, terms, writer, out_dtype=out_dtype, compute=compute, undo_out=undo_out,
                             warnings=warnings)
                del src
                return
            del src
    value = compute_tensor(plan, t, compute=compute, undo_out=undo_out, warnings=warnings)
    writer.write_tensor(t.name, value)


def _emit_blocks(plan: Plan, t: TensorPlan, src: torch.Tensor, terms: list[kernels.Term], writer: StreamWriter, *,
                 out_dtype: torch.dtype, compute: Compute, undo_out: UndoData | None,
                 warnings: list[str] | None) -> None:
    """The kernel over row blocks, each rounded straight into the writer's buffer. Undo data as
    :func:`compute_tensor` keeps it: with a reversible plan the positions where taking the deltas
    out again would not give the original bits back (found block by block with the same additions
    the exact unmerge will do); for an exact unmerge the stored values put back and the sha256 of
    the result checked. The sha256 are computed on a worker thread beside the blocks."""
    rows = src.shape[0]
    cols = src.numel() // rows
    W = src.reshape(rows, cols)
    step = kernels.rows_per_block(cols, BY_ST[t.out_dtype].itemsize, BUFFER_BYTES)
    if warnings is not None and t.ops and (note := swamp_warning(t, src, first_rows=step)):
        warnings.append(note)
    reversible = bool(undo_out is not None and plan.reversible and out_dtype == src.dtype and terms)
    undo_in = plan.undo_in
    exact = bool(plan.exact_undo and undo_in is not None and t.name in undo_in.patches)
    # reversible merges, and the exact unmerges of those made so, keep each product: the check
    # takes them out of the rounded result again with the same elementwise additions
    products = reversible or bool(exact and undo_in is not None and undo_in.kernel == KERNEL)
    blocks = _Blocks(W, terms, step, compute, out_dtype, products)
    restore = None
    if exact and undo_in is not None:
        encoded, values = undo_in.patches[t.name]
        restore = (decode_positions(encoded, src.numel()), values, BackgroundSha256())
    original = BackgroundSha256(src.reshape(-1).view(torch.uint8).numpy()) if reversible else None
    kept_at: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    try:
        writer.begin(t.name, t.out_dtype)
        for i, j, block, here in blocks:
            if not kernels.in_range(block, blocks.limit):
                raise _non_finite(plan.operation, t, W[i:j])
            out = writer.reserve((j - i) * cols * blocks.itemsize).view(out_dtype).view(j - i, cols)
            out.copy_(block)
            if reversible:
                kernels.remove_products(block, out, terms, i, j, here)
                back = block.to(src.dtype).cpu()
                ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[back.element_size()]
                at = torch.from_numpy(np.flatnonzero(np.not_equal(back.view(-1).view(ints).numpy(),
                                                                  W[i:j].reshape(-1).view(ints).numpy())))
                if at.numel():  # one pass finds them; the values are gathered at those positions only
                    kept_at.append(at + i * cols)
                    kept.append(W[i:j].reshape(-1).index_select(0, at))
            if restore is not None:
                positions, values, hasher = restore
                lo, hi = (int(x) for x in torch.searchsorted(positions, torch.tensor([i * cols, j * cols])))
                if hi > lo:
                    out.view(-1)[positions[lo:hi] - i * cols] = values[lo:hi].to(out_dtype)
                hasher.add(out.view(-1).view(torch.uint8).numpy().copy())  # the writer reuses its buffer
        writer.end()
    finally:  # the worker may still read src, whose map closes when this returns
        if original is not None:
            original.wait()
        if restore is not None:
            restore[2].wait()
    if restore is not None and undo_in is not None and restore[2].hexdigest() != undo_in.sha256.get(t.name):
        raise _not_restored(plan, t)
    if kept_at and undo_out is not None and original is not None:
        undo_out.patches[t.name] = (encode_indices(torch.cat(kept_at), src.numel()), torch.cat(kept))
        undo_out.sha256[t.name] = original.hexdigest()


class _Blocks:
    """The row blocks of one tensor with the edits applied, in a reused float32 (or float64) buffer:
    (i, j, block, products) — ``products`` the kept products of the mm-add kernel, else empty."""

    def __init__(self, W: torch.Tensor, terms: list[kernels.Term], step: int, compute: Compute,
                 out_dtype: torch.dtype, products: bool) -> None:
        self.W, self.terms, self.step, self.products = W, terms, step, products
        cols = W.shape[1]
        self.S = torch.empty(step * cols, dtype=compute.dtype, device=compute.device)
        self.P = [torch.empty(step, cols, dtype=compute.dtype, device=compute.device) for _ in terms] if products else []
        self.limit = kernels.finite_limit(out_dtype)
        self.itemsize = torch.empty((), dtype=out_dtype).element_size()

    def __iter__(self) -> Any:
        rows, cols = self.W.shape
        for i in range(0, rows, self.step):
            j = min(i + self.step, rows)
            block = self.S[:(j - i) * cols].view(j - i, cols)
            here = [p[:j - i] for p in self.P]
            if self.products:
                kernels.apply_products(block, self.W[i:j], self.terms, i, j, here)
            else:
                kernels.apply_block(block, self.W[i:j], self.terms, i, j)
            yield i, j, block, here


class BackgroundSha256:
    """A sha256 fed in order on a worker thread (hashlib releases the GIL while it hashes), so that
    hashing a tensor overlaps computing it; :meth:`hexdigest` waits for what was fed."""

    _pool: Any = None

    def __init__(self, *first: Any) -> None:
        self._hash = hashlib.sha256()
        self._last: Any = None
        for data in first:
            self.add(data)

    @classmethod
    def _worker(cls) -> Any:
        if cls._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-sha256")
        return cls._pool

    def add(self, data: Any) -> None:
        self._last = self._worker().submit(self._hash.update, data)

    def wait(self) -> None:
        if self._last is not None:
            self._last.result()

    def hexdigest(self) -> str:
        self.wait()
        return self._hash.hexdigest()


def compute_quantized(plan: Plan, t: TensorPlan, *, compute: Compute,
                      codes: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An FP8 weight with scales (``ops/fp8.py``), band by band: dequantized, edited in the compute
    dtype, then requantized (FP8 out: returns codes and the new scales in the stored scales' shape)
    or rounded once to the output dtype (returns the values, no scales). ``codes=False``: only the
    scales (for a scale tensor written before its weight)."""
    bs = t.quant
    assert bs is not None
    out_dtype = BY_ST[t.out_dtype].torch
    requant = t.out_dtype in fp8.QUANTIZED
    grid = plan.base.get(bs.scale).reshape(bs.grid)
    c = Compute(compute.dtype, compute.device)
    stats = fp8.QuantStats(t.name)
    new_grid = torch.empty(grid.shape, dtype=grid.dtype) if requant else None
    result = torch.empty(t.source.shape, dtype=out_dtype) if codes else None
    whole = any(e.whole for e in t.ops)
    with plan.base.view(t.name) as src:
        for i, j in fp8.bands(bs, tuple(src.shape), whole, CHUNK_ELEMENTS):
            old = fp8.scale_band(bs, grid, i, j)
            W = fp8.dequantize_band(bs, src[i:j], old, c.dtype).to(c.device)
            exact = apply_edits(W, [e.slice(i, j) for e in t.ops], c)
            if not kernels.in_range(exact, math.inf):  # one min/max pass: NaN and ±Inf fail it
                raise _non_finite(plan.operation, t, W.cpu())
            if requant:
                q, new = fp8.quantize_band(bs, exact, grid.dtype, old.to(exact.device))
                new_grid[fp8.scale_slice(bs, i, j)] = new.cpu()
                if codes:  # (and the statistics once, with the weight: not for a scale written first)
                    result[i:j] = q.cpu()
                    fp8.tally(stats, bs, W.cpu(), exact.cpu(), q.cpu(), new.cpu(), old)
            else:
                block = exact.to(out_dtype)
                if block.is_floating_point() and not _finite(block):
                    raise _non_finite(plan.operation, t, src[i:j])
                result[i:j] = block.cpu()
        src = None  # noqa: F841
    if requant:
        plan.quant.scales[t.name] = new_grid
        if codes:
            plan.quant.stats[t.name] = stats
        return result, new_grid.reshape(bs.info.shape)
    return result, None


def _emit_quantized(plan: Plan, t: TensorPlan, writer: StreamWriter, *, compute: Compute) -> None:
    """Write an FP8 weight with scales, or the scales of one: a scale tensor written before its
    weight is computed from the same bands (the weight is computed again when its turn comes,
    with bit-identical results); one written after takes the scales already computed."""
    if t.scale_of is not None:
        done = plan.quant.scales.get(t.scale_of)
        if done is None:
            weight = next(w for w in plan.tensors() if w.name == t.scale_of)
            compute_quantized(plan, weight, compute=compute, codes=False)
            done = plan.quant.scales[t.scale_of]
        writer.write_tensor(t.name, done.reshape(t.source.shape).contiguous())
        return
    before = plan.quant.scales.get(t.name)
    value, scales = compute_quantized(plan, t, compute=compute)
    if before is not None and scales is not None and not torch.equal(fp8.as_bytes(before), fp8.as_bytes(scales)):
        raise InternalError(f"{t.name}: its scales came out differently the second time they were computed.")
    writer.write_tensor(t.name, value)


def _not_restored(plan: Plan, t: TensorPlan) -> VerificationError:
    return VerificationError(
        f"{plan.operation}: {t.name} did not come back bit for bit (its sha256 differs from the one recorded "
        "at merge time); nothing was written.",
        tensor=t.name,
        hint="The arithmetic differs from the merge's (another device or BLAS?). Run unmerge with "
        "--no-exact to accept the rounding-level result (within 1 ulp).",
    )


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
    compute: Compute,
    single_name: str | None = None,
    progress: Progress | None = None,
    fingerprints: bool = True,
    on_shard: Callable[[ShardPlan, Path, list[Range]], None] | None = None,
) -> tuple[Result, dict[str, Path], dict[str, list[Range]]]:
    """Write ``plan``'s files into ``folder`` (a temporary folder: nothing here is atomic).
    ``single_name``: write the one shard under this name (a single-file output) and no index or
    side files. Returns the result, the written file of each planned shard, and (with
    ``fingerprints``) the fingerprinted byte ranges of each, for :func:`stream.check_ranges`.
    ``on_shard`` is called with each shard as soon as its file is complete (to check it while the
    next one is computed)."""
    start = time.perf_counter()
    total = plan.total_bytes()
    done = 0
    result = Result(out=folder, warnings=list(plan.warnings), plan=plan)
    meta_extra = provenance(plan)
    undo_out = UndoData(adapters=plan.merged_after)
    folder.mkdir(parents=True, exist_ok=True)
    own = undo_dir(folder / single_name, True) if single_name else undo_dir(folder, False)
    spill = UndoSpill(own / "parts")
    written: list[tuple[Path, list[TensorPlan], dict[str, tuple[int, int]]]] = []
    files: dict[str, Path] = {}
    ranges: dict[str, list[Range]] = {}
    for shard in plan.shards:
        base_meta = {}
        src_header = next((s.header for s in plan.base.shards if s.filename == shard.filename), None)
        if src_header is not None:
            base_meta = dict(src_header.metadata)
        base_meta.setdefault("format", "pt")
        base_meta.update(meta_extra)
        path = folder / (single_name or shard.filename)
        by_name = {t.name: t for t in shard.tensors}
        writer = StreamWriter(path, [(t.name, t.out_dtype, t.source.shape) for t in shard.tensors], base_meta,
                              fingerprints=fingerprints,
                              after={t.name: t.scale_of for t in shard.tensors if t.scale_of is not None})
        try:
            for name in writer.order:
                t = by_name[name]
                if t.copy and t.source.begin >= 0:
                    writer.copy_range(t.name, t.source)
                    result.copied += 1
                else:
                    emit_tensor(plan, t, writer, compute=compute, undo_out=undo_out, warnings=result.warnings)
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
        written.append((path, shard.tensors, {n: (writer.data_start + b, writer.data_start + e)
                                              for n, (b, e) in writer.offsets.items()}))
        files[shard.filename] = path
        ranges[shard.filename] = writer.ranges
        if on_shard is not None:
            on_shard(shard, path, writer.ranges)
    check_written(written)
    if plan.undo_in is not None:  # keep what later unmerges of the remaining adapters still need
        for name, norm in plan.undo_in.norms.items():
            if name not in result.changed:
                undo_out.norms[name] = norm
        for name, original in plan.undo_in.originals.items():
            if name not in result.changed:
                undo_out.originals[name] = original
        spill.add(undo_out)
    result.undo_bytes = spill.finish(own / UNDO_NAME, plan.merged_after)
    result.undo_reasons = spill.reasons()
    if own.is_dir() and not any(own.iterdir()):
        own.rmdir()
    if single_name is None:
        if plan.sharded:
            index = {
                "metadata": {"total_size": plan.total_bytes()},
                "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
            }
            (folder / str(plan.index_name)).write_text(json.dumps(index, indent=2) + "\n")
        for extra in plan.base.extra_files:
            if extra.name == "config.json" and plan.output_dtype:
                write_config_dtype(extra, folder / extra.name, plan.output_dtype, dequantized=plan.dequantized)
            else:
                shutil.copy2(extra, folder / extra.name)
    result.notes += fp8.summarize(list(plan.quant.stats.values()))
    result.seconds = time.perf_counter() - start
    return result, files, ranges


TORCH_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


def write_config_dtype(src: Path, dst: Path, dtype: str, *, dequantized: bool = False) -> None:
    """Copy config.json with its dtype set to what was written (``torch_dtype``, and ``dtype`` as
    transformers 5 names it), so that ``dtype="auto"`` loads the output in its own dtype; without
    ``quantization_config`` when the FP8 weights were written dequantized."""
    from ..jsonio import dump_json, read_json

    cfg = read_json(src, what="the model config")
    name = TORCH_NAMES.get(dtype, dtype)
    cfg["torch_dtype"] = name
    if dequantized:
        cfg.pop("quantization_config", None)
    if "dtype" in cfg:
        cfg["dtype"] = name
    dst.write_text(dump_json(cfg, indent=2) + "\n")


def check_written(written: list[tuple[Path, list[TensorPlan], dict[str, tuple[int, int]]]]) -> None:
    """Read every written header back (validated by the safetensors library): names, dtypes, shapes
    and byte ranges must be those planned — the ranges the byte check reads back are the tensors."""
    for path, tensors, offsets in written:
        header = read_header(path)
        want = {t.name: (t.out_dtype, tuple(t.source.shape), offsets[t.name]) for t in tensors}
        got = {n: (i.dtype, i.shape, (i.begin, i.end)) for n, i in header.tensors.items()}
        if want != got:
            raise InternalError(f"{path.name} does not hold what was planned; nothing was written.")
