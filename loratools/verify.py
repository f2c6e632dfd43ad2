"""Numerical verification of written outputs against a float64 reference.

For every tensor an operation changed, the reference is computed again in float64 from the base
and the adapters; the written value must lie within

    1 ulp of the output dtype at the reference value
    + the forward-error bound of the float32 computation: (r + 2)·u₃₂·(|W| + Σ|wᵢ sᵢ|·|Bᵢ|@|Aᵢ|)

(γ-bound for a length-r dot product plus the additions; a rigorous bound, so a failure is a real
error, not noise). DoRA tensors use (fan_in + r + 4)·u₃₂·|ref| for the norm. Every tensor an
operation did not change must be bit-identical to its source: their bytes are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint.safetensors_io import COPY_CHUNK, TensorInfo, load_tensor, read_header
from .dtypes import BY_ST
from .adapter import delta
from .ops.execute import apply_ops, row_blocks, slice_op
from .ops.plan import Op, Plan, TensorPlan

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
    """The spacing of ``dtype`` at each |x|, as float32 (x: float32; exact for powers of two)."""
    mant, emin = _FLOAT_FACTS[dtype]
    _, e = torch.frexp(x)  # x = m·2^e, m in [0.5, 1): floor(log2|x|) = e − 1
    e = torch.where(x == 0, torch.full_like(e, emin), (e - 1).clamp_(min=emin))
    return torch.ldexp(torch.ones_like(x), e - mant)


@dataclass
class TensorCheck:
    name: str
    dtype: str
    status: str  # "ok", "FAIL"
    kind: str  # "changed" or "identical"
    max_ulps: float = 0.0
    rel_err: float = 0.0
    mismatched: int = 0
    numel: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class VerifyReport:
    checks: list[TensorCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    def summary(self) -> str:
        changed = [c for c in self.checks if c.kind in ("changed", "restored")]
        worst = max((c.max_ulps for c in changed), default=0.0)
        state = "OK" if self.ok else f"FAILED ({len(self.failures)} tensor(s))"
        return (
            f"verify {state}: {len(changed)} changed tensor(s) within bounds (max {worst:.2f} ulp), "
            f"{len(self.checks) - len(changed)} bit-identical."
            if self.ok
            else f"verify {state}: " + ", ".join(c.name for c in self.failures[:10])
        )


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


def error_bound(t_ops: list[Op], W: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound (float32) on |computed − ref| from the float32 arithmetic, before rounding."""
    u = 2.0**-24
    dora = [op.module for op in t_ops if op.kind == "dora" and op.module is not None]
    if dora:
        m = dora[0]
        return torch.full(ref.shape, (m.fan_in + m.rank + 4) * u * float(ref.abs().max()))
    mag = torch.zeros(ref.shape) if any(op.kind == "replace" for op in t_ops) else W.abs().float()
    r_total = 0
    for op in t_ops:
        if op.kind == "replace" and op.tensor is not None:
            mag = op.tensor.float().abs()  # what came before is overwritten
        elif op.kind == "dora_undo" and op.module is not None and op.tensor is not None:
            m = op.module
            view = [1] * mag.dim()
            view[m.out_axis] = -1
            mag = mag * (op.tensor.float() / m.magnitude.float()).abs().reshape(view)
            r_total += m.rank + 2
            mag += delta(m.with_(A=m.A.float().abs(), B=m.B.float().abs(), scale=abs(m.scale)))
        elif op.kind == "delta" and op.module is not None:
            m = op.module
            r_total += m.rank
            mag += delta(m.with_(A=m.A.float().abs(), B=m.B.float().abs(), scale=abs(m.scale)), weight=abs(op.weight))
        elif op.kind == "bias" and op.module is not None and op.module.bias is not None:
            mag += op.module.bias.float().abs() * abs(op.weight * op.module.scale)
    # 1.01: the bound itself is evaluated in float32
    return mag.mul_(1.01 * (r_total + 2 + len(t_ops)) * u)


def check_changed(plan: Plan, t: TensorPlan, written: TensorInfo, *, fp64: bool = False) -> TensorCheck:
    """Compare one written tensor with the float64 reference, in row blocks."""
    out_dtype = BY_ST[t.out_dtype].torch
    src = plan.base.get(t.name)
    got_all = load_tensor(written)
    cpu = torch.device("cpu")
    max_ulps = max_err = max_ref = 0.0
    bad = 0
    scalar = src.dim() == 0
    for i, j in ([(0, 1)] if scalar else row_blocks(t, VERIFY_CHUNK)):
        ops = t.ops if scalar else [slice_op(op, i, j) for op in t.ops]
        W = src if scalar else src[i:j]
        ref = apply_ops(W.to(torch.float64), ops, dtype=torch.float64, device=cpu)
        got = got_all if scalar else got_all[i:j]
        err = (got.to(torch.float64) - ref).abs_().float()
        ref32 = ref.float()
        del ref
        if out_dtype in _FLOAT_FACTS:
            unit = ulp(ref32, out_dtype)
            bound = unit if fp64 else error_bound(ops, W, ref32).add_(unit)
            ulps = err / unit
        else:
            bound = torch.zeros_like(err)
            ulps = err
        bad += int((err > bound).sum()) + int((~torch.isfinite(got)).sum())
        if err.numel():
            max_ulps = max(max_ulps, float(ulps.max()))
            max_err = max(max_err, float(err.max()))
            max_ref = max(max_ref, float(ref32.abs().max()))
    return TensorCheck(
        t.name,
        t.out_dtype,
        "ok" if bad == 0 else "FAIL",
        "changed",
        max_ulps=max_ulps,
        rel_err=max_err / (max_ref or 1.0),
        mismatched=bad,
        numel=src.numel(),
    )


def verify_written(plan: Plan, files: dict[str, Path], *, fp64: bool = False) -> VerifyReport:
    """Check files just written for ``plan`` (shard filename → path) tensor by tensor."""
    report = VerifyReport()
    for shard in plan.shards:
        header = read_header(files[shard.filename])
        for t in shard.tensors:
            info = header.tensors.get(t.name)
            if info is None:
                report.checks.append(TensorCheck(t.name, t.out_dtype, "FAIL", "missing"))
                continue
            undo = plan.undo_in
            if t.ops and plan.exact_undo and undo is not None and t.name in undo.patches:
                # restored bit for bit: the original's sha256 recorded at merge time is the reference
                from .ops.undo import tensor_sha256

                ok = tensor_sha256(load_tensor(info)) == undo.sha256.get(t.name)
                report.checks.append(TensorCheck(t.name, t.out_dtype, "ok" if ok else "FAIL", "restored"))
            elif t.ops:
                report.checks.append(check_changed(plan, t, info, fp64=fp64))
            elif t.copy and t.source.begin >= 0:
                ok = same_bytes(t.source, info)
                report.checks.append(TensorCheck(t.name, t.out_dtype, "ok" if ok else "FAIL", "identical",
                                                 numel=0))
            else:  # a cast without ops (--dtype): one rounding of the source value
                src = plan.base.get(t.name).to(BY_ST[t.out_dtype].torch)
                ok = torch.equal(load_tensor(info), src)
                report.checks.append(TensorCheck(t.name, t.out_dtype, "ok" if ok else "FAIL", "identical"))
    return report
