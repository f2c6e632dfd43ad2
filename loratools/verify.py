"""Numerical verification of written outputs against a float64 reference (the checks; the
pipeline decides when they run, ``ops/check.py`` is the ``verify`` command).

For every tensor an operation changed, the reference is computed again in float64 from the base
and the adapters; the written value must lie within

    1 ulp of the output dtype at the reference value
    + the forward-error bound of the float32 computation: (r + 2)·u₃₂·(|W| + Σ|wᵢ sᵢ|·|Bᵢ|@|Aᵢ|)

(γ-bound for a length-r dot product plus the additions; a rigorous bound, so a failure is a real
error, not noise). DoRA tensors use (fan_in + r + 4)·u₃₂·|ref| for the norm. Every tensor an
operation did not change must be bit-identical to its source: their bytes are compared.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import LoraModule
from .checkpoint.reader import Checkpoint
from .checkpoint.safetensors_io import COPY_CHUNK, TensorInfo, load_tensor, read_header
from .checkpoint.stream import Range, check_ranges, mapped
from .deltas import LowRank
from .dtypes import BY_ST
from .errors import UnsupportedAdapterError, VerificationError
from .ops.edits import U32, AddDelta, Compute, Edit, apply_edits, error_bound, row_blocks
from .ops.plan import Plan, ShardPlan, TensorPlan

# (mantissa bits, smallest normal exponent) per floating dtype
VERIFY_CHUNK = 1 << 20  # elements per block: small enough to stay in cache

_FLOAT_FACTS = {
    torch.float64: (52, -1022),
    torch.float32: (23, -126),
    torch.float16: (10, -14),
    torch.bfloat16: (7, -126),
    torch.float8_e4m3fn: (3, -6),
    torch.float8_e5m2: (2, -14),
}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each |x| (x float64; exact powers of two, also for 0 and
    subnormals): 2^(max(floor(log2|x|), emin) − mantissa bits), read off x's exponent bits."""
    mant, emin = _FLOAT_FACTS[dtype]
    exponent = ((x.view(torch.int64) >> 52) & 0x7FF) - 1023
    return exponent.clamp_(min=emin).sub_(mant).add_(1023).bitwise_left_shift_(52).view(torch.float64)


@dataclass
class TensorCheck:
    name: str
    dtype: str
    status: str  # "ok", "FAIL"
    kind: str  # "changed" or "identical"
    max_ulps: float = 0.0  # in ulps of the output dtype at max(|W|, |ΔW|): meaningful where W and ΔW cancel
    rel_err: float = 0.0
    mismatched: int = 0
    numel: int = 0
    bound_ratio: float = 0.0  # the largest error / its bound: ≤ 1 passes
    sampled: int = 0  # rows re-computed (0: every element)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class VerifyReport:
    checks: list[TensorCheck] = field(default_factory=list)
    level: str = "full"  # "sample": seeded rows of each changed tensor; "full": every element
    bytes_checked: int = 0  # bytes of written files read back against the fingerprints taken as they were computed
    sample_rows: int = 0  # rows per changed tensor (level "sample")
    seed: int = 0

    def miss_probability(self, wrong: float = 0.1) -> float:
        """The probability that a changed tensor with a fraction ``wrong`` of wrong rows passes the
        row sample: at most (1 − wrong)^k for k rows drawn without replacement."""
        return (1.0 - wrong) ** self.sample_rows if self.level == "sample" else 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        changed = [c for c in self.checks if c.kind in ("changed", "restored")]
        identical = [c for c in self.checks if c.kind == "identical"]
        forward = [c for c in self.checks if c.kind == "forward"]
        worst = max((c.max_ulps for c in changed if c.kind == "changed"), default=0.0)
        if not self.ok:
            groups: dict[str, list[str]] = {}
            for c in self.failures:
                names = groups.setdefault(_FAILED_AS.get(c.kind, c.kind), [])
                if c.name not in names:
                    names.append(c.name)
            count = len({c.name for c in self.failures})
            return f"verify FAILED ({count} tensor(s)): " + "; ".join(
                f"{what}: {', '.join(names[:10])}{' …' if len(names) > 10 else ''}" for what, names in groups.items())
        fwd = f", {len(forward)} layer(s) agree in a forward pass" if forward else ""
        restored = [c for c in changed if c.kind == "restored"]
        computed = len(changed) - len(restored)
        parts = []
        if computed or not restored:
            ratio = max((c.bound_ratio for c in changed if c.kind == "changed"), default=0.0)
            rows = sum(c.sampled for c in changed if c.kind == "changed")
            how = (f" (float64 re-check of {rows:,} seeded random rows, {self.sample_rows} per tensor, seed "
                   f"{self.seed}: a tensor with 10% of its rows wrong passes unnoticed with probability "
                   f"≤ {100 * self.miss_probability():.1f}%)") if self.level == "sample" and rows else ""
            parts.append(f"{computed} changed tensor(s) within their bound{how} (the worst error is {ratio:.2f} of it; "
                         f"{worst:.2f} ulp of max(|W|, |ΔW|))")
        if restored:
            parts.append(f"{len(restored)} restored bit for bit (sha256 as recorded at merge time)")
        read = f"; {self.bytes_checked / 1e9:.2f} GB read back, byte for byte as computed" if self.bytes_checked else ""
        return f"verify OK: {', '.join(parts)}, {len(identical)} bit-identical{fwd}{read}."


_FAILED_AS = {
    "bytes": "bytes read back differ from those computed",
    "changed": "values outside their bound",
    "identical": "differ from the base they were copied from",
    "restored": "not restored bit for bit",
    "forward": "forward pass disagrees",
}


def same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    if a.nbytes != b.nbytes:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.begin)
        fb.seek(b.begin)
        left = a.nbytes
        while left:
            n = min(COPY_CHUNK, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


@dataclass
class _Tally:
    """Errors of computed values against a float64 reference, accumulated block by block."""

    bad: int = 0
    max_ulps: float = 0.0
    max_ratio: float = 0.0
    max_err: float = 0.0
    max_ref: float = 0.0

    def add(self, got: torch.Tensor, ref: torch.Tensor, W64: torch.Tensor, arith: torch.Tensor | None,
            out_dtype: torch.dtype) -> None:
        """``arith``: the bound of the arithmetic before the final rounding (None: exact, fp64)."""
        err = (got.to(torch.float64) - ref).abs_()
        if out_dtype in _FLOAT_FACTS:
            unit = ulp(ref, out_dtype)
            bound = unit if arith is None else arith.double().add_(unit)
            # measured in ulps of the larger of |W| and |ΔW|: where they cancel, ulps of the tiny
            # result say nothing (an exact zero has a subnormal ulp)
            ulps = err / ulp(torch.maximum(W64.abs(), (ref - W64).abs()), out_dtype)
            ratio = err / bound
        else:
            bound = torch.zeros_like(err)
            ulps = ratio = err
        self.bad += int((err > bound).sum())
        if err.numel():
            block_err = float(err.max())
            if not math.isfinite(block_err):  # NaN compares false above: count non-finite values here
                self.bad += int((~torch.isfinite(err)).sum())
            self.max_ulps = max(self.max_ulps, float(ulps.max()))
            self.max_ratio = max(self.max_ratio, float(ratio.max()))
            self.max_err = max(self.max_err, block_err)
            self.max_ref = max(self.max_ref, float(ref.abs().max()))

    def check(self, t: TensorPlan, numel: int, sampled: int = 0) -> TensorCheck:
        return TensorCheck(t.name, t.out_dtype, "ok" if self.bad == 0 else "FAIL", "changed", max_ulps=self.max_ulps,
                           rel_err=self.max_err / (self.max_ref or 1.0), mismatched=self.bad, numel=numel,
                           bound_ratio=self.max_ratio, sampled=sampled)


def check_changed(plan: Plan, t: TensorPlan, written: TensorInfo, *, fp64: bool = False) -> TensorCheck:
    """Compare one written tensor with the float64 reference, in row blocks."""
    out_dtype = BY_ST[t.out_dtype].torch
    c64 = Compute(torch.float64, torch.device("cpu"))
    tally = _Tally()
    # both read through maps that live as long as this tensor: memory stays one tensor's worth
    with plan.base.view(t.name) as src, mapped(written.file, written.begin, written.nbytes,
                                               written.torch_dtype) as flat:
        got_all = flat.view(written.shape)
        scalar = src.dim() == 0
        for i, j in ([(0, 1)] if scalar else row_blocks(tuple(src.shape), t.ops, VERIFY_CHUNK)):
            ops = t.ops if scalar else [e.slice(i, j) for e in t.ops]
            W = src if scalar else src[i:j]
            ref = apply_edits(W.to(torch.float64), ops, c64)
            tally.add(got_all if scalar else got_all[i:j], ref, W.to(torch.float64),
                      None if fp64 else error_bound(ops, W, ref), out_dtype)
        numel = src.numel()
        W = got_all = flat = src = None  # noqa: F841 (the maps close with the last view)
    return tally.check(t, numel)


# --- the default check: seeded rows in float64, every byte by fingerprint ---------------------------

SAMPLE_ROWS = 32  # rows per changed tensor: a tensor with 10% wrong rows slips through with p ≤ 0.9**32 ≈ 3.4%


def sample_rows(name: str, rows: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct rows of ``rows``, sorted, drawn by a generator seeded from ``seed`` and the
    tensor's name (every tensor its own sample; the same on every run); all rows when k ≥ rows."""
    if rows <= k:
        return torch.arange(rows)
    g = torch.Generator().manual_seed((seed << 32) ^ zlib.crc32(name.encode("utf-8", "surrogatepass")))
    return torch.randperm(rows, generator=g)[:k].sort().values


def reference_rows(edits: list[Edit], W64: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference, bound of the float32 arithmetic) at stored rows ``idx`` (W64: those rows of the
    base in float64). Plain low-rank deltas are re-computed from their own factors in one product
    per edit (``LoraModule.take``, not the merge kernel); other edits row by row through their own
    float64 ``apply``."""
    if all(type(e) is AddDelta and e.module is not None and e.window is None for e in edits):
        ref, mag, depth = W64.clone(), W64.abs(), 0
        for e in edits:
            ref += e.module.take(idx, weight=e.weight)
            mag += e.module.take(idx, weight=e.weight, magnitude=True)
            depth += e.module.delta.depth
        return ref, mag.mul_(1.01 * (depth + 2 + len(edits)) * U32)
    c64 = Compute(torch.float64, torch.device("cpu"))
    refs, bounds = [], []
    for r, i in enumerate(idx.tolist()):
        ops = [e.slice(i, i + 1) for e in edits]
        W = W64[r:r + 1]
        ref = apply_edits(W.clone(), ops, c64)
        refs.append(ref)
        bounds.append(error_bound(ops, W, ref).double())
    return torch.cat(refs), torch.cat(bounds)


def check_sample(plan: Plan, t: TensorPlan, written: TensorInfo, *, k: int = SAMPLE_ROWS, seed: int = 0,
                 fp64: bool = False) -> TensorCheck:
    """One written tensor at ``k`` seeded rows against the float64 reference; edits that need
    whole columns (a DoRA norm per input) are checked in full instead."""
    if t.quant is not None:
        return check_quantized(plan, t, written, plan.quant.scales.get(t.name), k=k, seed=seed, fp64=fp64)
    if not t.source.shape or any(e.whole for e in t.ops):
        return check_changed(plan, t, written, fp64=fp64)
    out_dtype = BY_ST[t.out_dtype].torch
    idx = sample_rows(t.name, t.source.shape[0], k, seed)
    if t.source.begin >= 0:
        W64 = read_rows(t.source, idx).to(torch.float64)
    else:
        W64 = plan.base.get(t.name)[idx].to(torch.float64)
    got_rows = read_rows(written, idx)
    numel = math.prod(t.source.shape)
    tally = _Tally()
    if not t.ops:  # a cast (--dtype): exactly one rounding of the base's values
        tally.add(got_rows, W64.to(out_dtype).to(torch.float64), W64, None, out_dtype)
    else:
        ref, bound = reference_rows(t.ops, W64, idx)
        tally.add(got_rows, ref, W64, None if fp64 else bound, out_dtype)
    return tally.check(t, numel, sampled=len(idx))


def check_quantized(plan: Plan, t: TensorPlan, written: TensorInfo, new_grid: torch.Tensor | None, *,
                    k: int | None = SAMPLE_ROWS, seed: int = 0, fp64: bool = False) -> TensorCheck:
    """An FP8 weight with scales (``ops/fp8.py``) at ``k`` seeded rows (every row with k=None): the
    base dequantized in float64, the reference computed from the adapters' own factors, and the
    written value — requantized codes times the scales computed with them (whose bytes the
    fingerprint check reads back), or the dequantized output — within one e4m3 step of its block
    scale (or one ulp of the output dtype) plus the float32 arithmetic's bound. With every row,
    each block's scale must be its max |W'| / 448 rounded up; with a sample, no larger value than
    448 of it may be in the sampled rows."""
    from .ops import fp8

    bs = t.quant
    assert bs is not None
    requant = t.out_dtype in fp8.QUANTIZED
    rows = t.source.shape[0] if t.source.shape else 1
    numel = math.prod(t.source.shape)
    if requant and (new_grid is None or tuple(new_grid.shape) != bs.grid):
        return TensorCheck(t.name, t.out_dtype, "FAIL", "changed", numel=numel)
    grid = plan.base.get(bs.scale).reshape(bs.grid)
    if k is None or bs.per_tensor or any(e.whole for e in t.ops):
        everything = torch.arange(rows)
        step = max(1, VERIFY_CHUNK // max(1, numel // max(rows, 1)))
        if not bs.per_tensor and not bs.lead:  # whole blocks of rows per chunk: each block's max in one piece
            step = max(bs.block[0], step // bs.block[0] * bs.block[0])
        chunks = [everything[i:i + step] for i in range(0, rows, step)]
        full = True
    else:
        chunks = [sample_rows(t.name, rows, max(1, k // 8) if bs.lead else k, seed)]
        full = False
    tally = _Tally()
    amax: torch.Tensor | None = None
    sampled = 0
    for idx in chunks:
        codes = read_rows(t.source, idx) if t.source.begin >= 0 else plan.base.get(t.name)[idx]
        W64 = fp8.dequantize_rows(bs, codes, grid, idx)
        ref, bound = reference_rows(t.ops, W64, idx)
        got_rows = read_rows(written, idx)
        sampled += len(idx)
        if not requant:
            tally.add(got_rows, ref, W64, None if fp64 else bound, BY_ST[t.out_dtype].torch)
            continue
        s = fp8.expand_rows(bs, new_grid, idx, got_rows.shape[-1]) if not bs.per_tensor else \
            new_grid.double().reshape(())
        got = got_rows.double() * s
        tally.add(got / s, ref / s, W64 / s, None if fp64 else bound.double() / s, torch.float8_e4m3fn)
        top = (ref / s).abs()
        if top.numel() and float(top.max()) > fp8.E4M3_MAX * (1 + 2.0**-20):
            tally.bad += 1  # a scale too small for its block: the value would have saturated
        if full and bs.per_tensor:
            part = ref.abs().max().reshape(1, 1)
            amax = part if amax is None else torch.maximum(amax, part)
        elif full:
            part = fp8.block_amax(ref, bs.block)
            amax = part if amax is None else torch.cat([amax, part], dim=0)
    if full and requant and amax is not None:
        want = amax.reshape(bs.grid) / fp8.E4M3_MAX
        lo = fp8.round_up_scales(want * (1 - 2.0**-20), new_grid.dtype, bs.pow2).double()
        hi = fp8.round_up_scales(want * (1 + 2.0**-20), new_grid.dtype, bs.pow2).double()
        have = new_grid.double()
        zero = want == 0
        tally.bad += int((((have < lo) | (have > hi)) & ~zero).sum())
    return tally.check(t, numel, sampled=0 if full else sampled)


def read_rows(info: TensorInfo, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of a stored tensor, read from its file with one pread each (the file as it is
    on disk, through the header read back by the safetensors library, not the writer's buffers)."""
    dtype = info.torch_dtype
    row_bytes = info.nbytes // max(info.shape[0], 1)
    buf = bytearray(row_bytes * len(idx))
    with open(info.file, "rb") as f:
        for n, i in enumerate(idx.tolist()):
            got = os.preadv(f.fileno(), [memoryview(buf)[n * row_bytes:(n + 1) * row_bytes]], info.begin + i * row_bytes)
            if got != row_bytes:
                raise VerificationError(f"{info.file} ended inside tensor {info.name}.", path=info.file, tensor=info.name)
    return torch.frombuffer(buf, dtype=dtype).view(len(idx), *info.shape[1:]) if buf else torch.empty(
        0, *info.shape[1:], dtype=dtype)


def check_bytes(plan: Plan, files: dict[str, Path], ranges: dict[str, list[Range]]) -> tuple[list[TensorCheck], int]:
    """Every fingerprinted range read back from the written files; a failing range names the
    tensors it holds. Returns (failures, bytes read)."""
    failures: list[TensorCheck] = []
    read = 0
    for shard in plan.shards:
        bad, n = _check_shard_bytes(files[shard.filename], ranges.get(shard.filename, []))
        failures += bad
        read += n
    return failures, read


def _check_shard_bytes(path: Path, ranges: list[Range]) -> tuple[list[TensorCheck], int]:
    failures: list[TensorCheck] = []
    bad = check_ranges(path, ranges)
    if bad:
        infos = read_header(path).tensors.values()
        for r in bad:
            hit = [i for i in infos if i.begin < r.offset + r.length and r.offset < i.end] or [None]
            for i in hit:
                failures.append(TensorCheck(i.name if i else r.label, i.dtype if i else "", "FAIL", "bytes"))
    return failures, sum(r.length for r in ranges)


def check_shard(plan: Plan, shard: ShardPlan, path: Path, ranges: list[Range], *, k: int = SAMPLE_ROWS,
                seed: int = 0, fp64: bool = False) -> tuple[list[TensorCheck], int]:
    """The default check of one written shard: every byte read back against the fingerprint taken
    when it was computed (or of the source it was copied from), and ``k`` seeded rows of every
    changed tensor re-computed in float64 from the adapters' own factors. Returns (checks, bytes read)."""
    failures, read = _check_shard_bytes(path, ranges)
    failed = {c.name for c in failures}
    checks: list[TensorCheck] = []
    header = read_header(path)
    for t in shard.tensors:
        info = header.tensors.get(t.name)
        if info is None:
            checks.append(TensorCheck(t.name, t.out_dtype, "FAIL", "missing"))
        elif t.copy and t.source.begin >= 0:
            checks.append(TensorCheck(t.name, t.out_dtype, "FAIL" if t.name in failed else "ok", "identical"))
        elif t.scale_of is not None:  # checked with its weight; its bytes by the fingerprint
            checks.append(TensorCheck(t.name, t.out_dtype, "FAIL" if t.name in failed else "ok", "changed"))
        elif t.ops and plan.exact_undo and plan.undo_in is not None and t.name in plan.undo_in.patches:
            # its sha256 was checked as it was computed; the bytes check says the file holds them
            checks.append(TensorCheck(t.name, t.out_dtype, "FAIL" if t.name in failed else "ok", "restored"))
        else:
            checks.append(check_sample(plan, t, info, k=k, seed=seed, fp64=fp64))
    return checks + failures, read


class ShardChecker:
    """Runs :func:`check_shard` on each shard as soon as it is written, in a background thread, so
    that the check of one shard overlaps the computation of the next; :meth:`report` waits for all."""

    def __init__(self, plan: Plan, *, fp64: bool = False, k: int = SAMPLE_ROWS, seed: int = 0) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.plan, self.fp64, self.k, self.seed = plan, fp64, k, seed
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-verify")
        self._jobs: list = []

    def __call__(self, shard: ShardPlan, path: Path, ranges: list[Range]) -> None:
        self._jobs.append(self._pool.submit(check_shard, self.plan, shard, path, ranges, k=self.k, seed=self.seed,
                                            fp64=self.fp64))

    def report(self) -> VerifyReport:
        report = VerifyReport(level="sample", sample_rows=self.k, seed=self.seed)
        try:
            for job in self._jobs:
                checks, read = job.result()
                report.checks += checks
                report.bytes_checked += read
        finally:
            self.close()
        return report

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def check_tensor(plan: Plan, t: TensorPlan, info: TensorInfo, *, fp64: bool = False,
                 scales: torch.Tensor | None = None) -> TensorCheck:
    """One output tensor against what ``plan`` says it must be (``scales``: the requantized scales
    of an FP8 weight, when not the ones computed for ``plan``)."""
    if tuple(info.shape) != tuple(t.source.shape):
        return TensorCheck(t.name, info.dtype, "FAIL", "shape")
    if t.quant is not None:
        grid = plan.quant.scales.get(t.name) if scales is None else scales
        return check_quantized(plan, t, info, grid, k=None, fp64=fp64)
    if t.scale_of is not None:
        return TensorCheck(t.name, t.out_dtype, "ok", "changed")  # checked with its weight
    undo = plan.undo_in
    if t.ops and plan.exact_undo and undo is not None and t.name in undo.patches:
        # restored bit for bit: the original's sha256 recorded at merge time is the reference
        from .ops.undo import tensor_sha256  # noqa: PLC0415 (undo data is read only here)

        ok = tensor_sha256(load_tensor(info)) == undo.sha256.get(t.name)
        return TensorCheck(t.name, t.out_dtype, "ok" if ok else "FAIL", "restored")
    if t.ops:
        return check_changed(plan, t, info, fp64=fp64)
    if info.dtype == t.source.dtype and t.source.begin >= 0:
        return TensorCheck(t.name, t.out_dtype, "ok" if same_bytes(t.source, info) else "FAIL", "identical")
    # a cast without ops (--dtype): one rounding of the source value
    src = plan.base.get(t.name).to(info.torch_dtype)
    return TensorCheck(t.name, info.dtype, "ok" if torch.equal(load_tensor(info), src) else "FAIL", "identical")


def verify_written(plan: Plan, files: dict[str, Path], *, fp64: bool = False,
                   progress: Callable[[int, int, str], None] | None = None,
                   ranges: dict[str, list[Range]] | None = None) -> VerifyReport:
    """Check files just written for ``plan`` (shard filename → path) tensor by tensor, every
    element (``--verify-full``); ``progress`` is told (bytes checked, bytes in all,
    "verify:<tensor>"). With ``ranges`` the byte fingerprints are read back too."""
    report = VerifyReport()
    if ranges is not None:
        failures, report.bytes_checked = check_bytes(plan, files, ranges)
        report.checks += failures
    total = plan.total_bytes()
    done = 0
    for shard in plan.shards:
        header = read_header(files[shard.filename])
        for t in shard.tensors:
            info = header.tensors.get(t.name)
            if info is None:
                report.checks.append(TensorCheck(t.name, t.out_dtype, "FAIL", "missing"))
            else:
                report.checks.append(check_tensor(plan, t, info, fp64=fp64))
            done += t.out_nbytes
            if progress:
                progress(done, total, f"verify:{t.name}")
    return report


# --- loratools verify ----------------------------------------------------------------------------


def _layer(W: torch.Tensor, x: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A linear layer's forward with its stored weight: nn.Linear (out, in) or GPT-2 Conv1D (in, out)."""
    return x @ (W if transposed else W.T)


def _factors64(m: LoraModule, weight: float, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) in float64 such that the layer adds s·(x Aᵀ) Bᵀ: a low-rank module's own factors
    (the layer's path x → A → B, never through :func:`loratools.delta`), other kinds as (I, ΔW) —
    for a change that is a function of W, ΔW = f(W) − W in float64."""
    d = m.delta
    if isinstance(d, LowRank):
        return d.A.double(), d.B.double(), d.scale * weight
    if not getattr(d, "additive", True):
        W64 = W.double()
        dW = d.apply(W64, out_axis=m.out_axis, weight=abs(weight), inverse=weight < 0) - W64  # type: ignore[attr-defined]
        dW = dW.T if m.transposed else dW.reshape(m.fan_out, -1)
        return torch.eye(m.fan_in, dtype=torch.float64), dW, 1.0
    return torch.eye(m.fan_in, dtype=torch.float64), d.matrix(dtype=torch.float64), weight


def forward_check(parts: list[tuple[LoraModule, float]], W: torch.Tensor, merged: torch.Tensor, *, dtype: str,
                  seed: int = 0, n: int = 16) -> TensorCheck:
    """Random inputs through one targeted layer: every adapter that changes it applied un-merged,
    the way the layer runs it (x → A → B per adapter, summed), against the merged weight.

    ``parts``: (module, weight) of each adapter on this tensor (DoRA is always alone on its
    tensor: planning refuses it beside other changes)."""
    g = torch.Generator().manual_seed(seed)
    m = parts[0][0]
    if len(parts) > 1 and any(not getattr(p.delta, "additive", True) for p, _ in parts):
        raise UnsupportedAdapterError(f"{m.target}: --forward checks a change that is a function of W "
                                      "((IA)³, OFT) only when it is the tensor's one change; the element check "
                                      "covers it.", tensor=m.target)
    fs = [_factors64(p, w, W) for p, w in parts]
    rank = sum(int(A.shape[0]) for A, _, _ in fs)
    W64, M64 = W.double(), merged.double()
    mant = _FLOAT_FACTS.get(BY_ST[dtype].torch, (52, 0))[0]
    u = 2.0**-24
    dora = m.magnitude is not None and len(parts) == 1
    if m.kind == "embedding":
        idx = torch.randint(0, W.shape[0], (n,), generator=g)
        ref = W64[idx] + sum(s * (A[:, idx].T @ B.T) for A, B, s in fs)
        got = M64[idx]
        bound = 2.0**-mant * got.abs() + (rank + 4) * u * (
            W64[idx].abs() + sum(abs(s) * (A[:, idx].T.abs() @ B.T.abs()) for A, B, s in fs))
        if dora:  # DoRA on an embedding (PEFT): normed per embedding dimension, over the vocabulary
            A, B, s = fs[0]
            norm = torch.linalg.vector_norm(W64 + s * (A.T @ B.T), dim=0)
            ref = ref * (m.magnitude.double() / norm)
            bound = (4 * 2.0**-mant + (W.shape[0] + rank + 8) * u) * ref.abs().max() * torch.ones_like(ref)
    elif m.kind == "conv":
        k = m.kernel
        pad = [d // 2 for d in k]
        conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[len(k)]
        x = torch.randn(2, W.shape[1], *[d + 4 for d in k], generator=g, dtype=torch.float64)
        convs = [(A.reshape(A.shape[0], W.shape[1], *k), B.reshape(m.fan_out, B.shape[1], *([1] * len(k))), s)
                 for A, B, s in fs]
        ref = conv(x, W64, padding=pad) + sum(s * conv(conv(x, down, padding=pad), up) for down, up, s in convs)
        got = conv(x, M64, padding=pad)
        mag = conv(x.abs(), M64.abs(), padding=pad)
        bound = 2.0**-mant * mag + (rank + 4 + W[0].numel()) * u * (conv(x.abs(), W64.abs(), padding=pad) + sum(
            abs(s) * conv(conv(x.abs(), down.abs(), padding=pad), up.abs()) for down, up, s in convs))
        if dora and m.dora_per_input:  # old LyCORIS: normed per input channel = the input scaled per channel
            down, up, s = convs[0]
            effective = W64 + s * torch.einsum("or,r...->o...", up.reshape(m.fan_out, -1), down)
            dims = tuple(d for d in range(effective.dim()) if d != 1)
            factor = (m.magnitude.double() / torch.linalg.vector_norm(effective, dim=dims)).reshape(1, -1, *([1] * len(k)))
            xs = x * factor
            ref = conv(xs, W64, padding=pad) + sum(s * conv(conv(xs, down, padding=pad), up) for down, up, s in convs)
            bound = (4 * 2.0**-mant + (W[0].numel() + rank + 8) * u) * ref.abs().max() * torch.ones_like(ref)
        elif dora:  # DoRA: the composed kernel of the two LoRA convs, normed per output channel
            down, up, s = convs[0]
            effective = W64 + s * torch.einsum("or,r...->o...", up.reshape(m.fan_out, -1), down)
            norm = torch.linalg.vector_norm(effective.reshape(m.fan_out, -1), dim=1)
            ref = ref * (m.magnitude.double() / norm).reshape(1, -1, *([1] * len(k)))
            bound = (4 * 2.0**-mant + (W[0].numel() + rank + 8) * u) * ref.abs().max() * torch.ones_like(ref)
    else:
        t = bool(m.transposed)
        x = torch.randn(n, m.fan_in, generator=g, dtype=torch.float64)
        ref = _layer(W64, x, t) + sum(s * ((x @ A.T) @ B.T) for A, B, s in fs)
        got = _layer(M64, x, t)
        if dora:  # DoRA: m / ‖W + ΔW‖, with W + ΔW read off the layer itself
            A, B, s = fs[0]
            eye = torch.eye(m.fan_in, dtype=torch.float64)
            effective = (_layer(W64, eye, t) + s * ((eye @ A.T) @ B.T)).T  # (out, in)
            per_input = m.dora_per_input  # old LyCORIS: per input column, else per output row
            norm = torch.linalg.vector_norm(effective, dim=0 if per_input else 1, keepdim=True)
            factor = m.magnitude.double().reshape(norm.shape) / norm
            ref = x @ (effective * factor).T
            bound = (4 * 2.0**-mant + (m.fan_in + rank + 8) * u) * ref.abs().max() * torch.ones_like(ref)
        else:
            bound = 2.0**-mant * (x.abs() @ (M64.abs() if t else M64.abs().T)) + (rank + 4 + len(fs)) * u * (
                x.abs() @ (W64.abs() if t else W64.abs().T)
                + sum(abs(s) * ((x.abs() @ A.abs().T) @ B.abs().T) for A, B, s in fs))
    err = (got - ref).abs()
    bad = int((err > bound * 1.0001).sum())
    return TensorCheck(m.target, dtype, "ok" if bad == 0 else "FAIL", "forward",
                       max_ulps=float((err / bound.clamp_min(1e-300)).max()),
                       rel_err=float(err.max()) / (float(ref.abs().max()) or 1.0), mismatched=bad, numel=err.numel())


def forward_experts(parts: list[tuple[LoraModule, float]], W: torch.Tensor, merged: torch.Tensor, *, dtype: str,
                    seed: int = 0) -> TensorCheck:
    """Fused experts (E, d1, d2): every expert's layer run on random inputs, x → A_e → B_e un-merged
    against x through merged[e] — as :func:`forward_check` does for one layer; the worst expert is
    reported for the tensor."""
    target = parts[0][0].target
    if len(parts) > 1 or parts[0][0].kind != "experts":
        raise UnsupportedAdapterError(f"{target}: --forward checks fused experts changed by one adapter only; the "
                                      "element check covers them.", tensor=target)
    m, w = parts[0]
    d = m.delta
    worst: TensorCheck | None = None
    bad = numel = 0
    for e in range(int(W.shape[0])):
        one = LoraModule(f"{target}[{e}]", d.expert(e), kind="linear", transposed=d.transposed)  # type: ignore[attr-defined]
        c = forward_check([(one, w)], W[e], merged[e], dtype=dtype, seed=seed + e, n=4)
        bad, numel = bad + c.mismatched, numel + c.numel
        if worst is None or c.max_ulps > worst.max_ulps:
            worst = c
    assert worst is not None
    return TensorCheck(target, dtype, "ok" if bad == 0 else "FAIL", "forward", max_ulps=worst.max_ulps,
                       rel_err=worst.rel_err, mismatched=bad, numel=numel)


def check_against(plan: Plan, out: Checkpoint, *, forward: bool = False,
                  progress: Callable[[int, int, str], None] | None = None) -> VerifyReport:
    """Every tensor of ``out`` against what ``plan`` says it must be; missing and extra ones fail."""
    from .ops.fp8 import BlockScale, find_quantized

    ckpt = plan.base
    report = VerifyReport()
    names = plan.tensors()
    quantized = find_quantized(ckpt)
    dequantized = {q.scale: w for w, q in quantized.items() if isinstance(q, BlockScale)}
    for i, t in enumerate(names, start=1):
        info = out.tensors.get(t.name)
        weight = dequantized.get(t.name)
        if weight is not None and out.tensors.get(weight) is not None and \
                out.tensors[weight].dtype != ckpt.tensors[weight].dtype:
            if info is None:
                continue  # the scales of a weight MERGED holds dequantized (--dtype)
        q = quantized.get(t.name)
        if info is not None and isinstance(q, BlockScale) and info.dtype != t.source.dtype:
            t.quant = q  # MERGED holds this FP8 weight dequantized
        if info is None:
            report.checks.append(TensorCheck(t.name, t.source.dtype, "FAIL", "missing"))
            continue
        if BY_ST[info.dtype].floating and BY_ST[t.source.dtype].floating:
            t.out_dtype = info.dtype  # MERGED may have been written with --dtype
        elif info.dtype != t.source.dtype:
            report.checks.append(TensorCheck(t.name, info.dtype, "FAIL", "dtype"))
            continue
        scales = None
        if t.quant is not None and info.dtype == t.source.dtype:
            held = out.tensors.get(t.quant.scale)
            if held is None or tuple(held.shape) != tuple(t.quant.info.shape):
                report.checks.append(TensorCheck(t.quant.scale, t.quant.info.dtype, "FAIL", "missing"))
                continue
            scales = out.get(t.quant.scale).reshape(t.quant.grid)
        report.checks.append(check_tensor(plan, t, info, scales=scales))
        if progress:
            progress(i, len(names), t.name)
    for name in sorted(set(out.tensors) - set(ckpt.tensors)):
        report.checks.append(TensorCheck(name, out.tensors[name].dtype, "FAIL", "extra"))
    if forward:  # one check per adapted tensor, with every adapter that changes it
        by_target: dict[str, list[tuple[LoraModule, float]]] = {}
        for ai in plan.adapters:
            for target, m in ai.adapter.modules.items():
                by_target.setdefault(target, []).append((m, float(ai.sign * (ai.weight or 0.0))))
        for target, parts in by_target.items():
            if target in out.tensors and tuple(out.tensors[target].shape) == tuple(ckpt.tensors[target].shape):
                check = forward_experts if any(m.kind == "experts" for m, _ in parts) else forward_check
                report.checks.append(check(parts, ckpt.get(target), out.get(target),
                                           dtype=out.tensors[target].dtype, seed=len(report.checks)))
    return report
