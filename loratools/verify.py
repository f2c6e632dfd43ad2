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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import LoraModule
from .checkpoint.reader import Checkpoint
from .checkpoint.safetensors_io import COPY_CHUNK, TensorInfo, load_tensor, read_header
from .deltas import LowRank
from .dtypes import BY_ST
from .ops.edits import Compute, apply_edits, error_bound, row_blocks
from .ops.plan import Plan, TensorPlan

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
        identical = [c for c in self.checks if c.kind == "identical"]
        forward = [c for c in self.checks if c.kind == "forward"]
        worst = max((c.max_ulps for c in changed if c.kind == "changed"), default=0.0)
        if not self.ok:
            return f"verify FAILED ({len(self.failures)} tensor(s)): " + ", ".join(c.name for c in self.failures[:10])
        fwd = f", {len(forward)} layer(s) agree in a forward pass" if forward else ""
        restored = [c for c in changed if c.kind == "restored"]
        computed = len(changed) - len(restored)
        parts = []
        if computed or not restored:
            ratio = max((c.bound_ratio for c in changed if c.kind == "changed"), default=0.0)
            parts.append(f"{computed} changed tensor(s) within their bound (the worst error is {ratio:.2f} of it; "
                         f"{worst:.2f} ulp of max(|W|, |ΔW|))")
        if restored:
            parts.append(f"{len(restored)} restored bit for bit (sha256 as recorded at merge time)")
        return f"verify OK: {', '.join(parts)}, {len(identical)} bit-identical{fwd}."


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


def check_changed(plan: Plan, t: TensorPlan, written: TensorInfo, *, fp64: bool = False) -> TensorCheck:
    """Compare one written tensor with the float64 reference, in row blocks."""
    out_dtype = BY_ST[t.out_dtype].torch
    src = plan.base.get(t.name)
    got_all = load_tensor(written)
    c64 = Compute(torch.float64, torch.device("cpu"))
    max_ulps = max_err = max_ref = max_ratio = 0.0
    bad = 0
    scalar = src.dim() == 0
    for i, j in ([(0, 1)] if scalar else row_blocks(tuple(src.shape), t.ops, VERIFY_CHUNK)):
        ops = t.ops if scalar else [e.slice(i, j) for e in t.ops]
        W = src if scalar else src[i:j]
        ref = apply_edits(W.to(torch.float64), ops, c64)
        got = got_all if scalar else got_all[i:j]
        err = (got.to(torch.float64) - ref).abs_()
        if out_dtype in _FLOAT_FACTS:
            unit = ulp(ref, out_dtype)
            bound = unit if fp64 else error_bound(ops, W, ref).double().add_(unit)
            # measured in ulps of the larger of |W| and |ΔW|: where they cancel, ulps of the tiny
            # result say nothing (an exact zero has a subnormal ulp)
            W64 = W.to(torch.float64)
            ulps = err / ulp(torch.maximum(W64.abs(), (ref - W64).abs()), out_dtype)
            ratio = err / bound
        else:
            bound = torch.zeros_like(err)
            ulps = ratio = err
        bad += int((err > bound).sum())
        if err.numel():
            block_err = float(err.max())
            if not math.isfinite(block_err):  # NaN compares false above: count non-finite values here
                bad += int((~torch.isfinite(err)).sum())
            max_ulps = max(max_ulps, float(ulps.max()))
            max_ratio = max(max_ratio, float(ratio.max()))
            max_err = max(max_err, block_err)
            max_ref = max(max_ref, float(ref.abs().max()))
    return TensorCheck(
        t.name,
        t.out_dtype,
        "ok" if bad == 0 else "FAIL",
        "changed",
        max_ulps=max_ulps,
        rel_err=max_err / (max_ref or 1.0),
        mismatched=bad,
        numel=src.numel(),
        bound_ratio=max_ratio,
    )


def check_tensor(plan: Plan, t: TensorPlan, info: TensorInfo, *, fp64: bool = False) -> TensorCheck:
    """One output tensor against what ``plan`` says it must be."""
    if tuple(info.shape) != tuple(t.source.shape):
        return TensorCheck(t.name, info.dtype, "FAIL", "shape")
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
                   progress: Callable[[int, int, str], None] | None = None) -> VerifyReport:
    """Check files just written for ``plan`` (shard filename → path) tensor by tensor;
    ``progress`` is told (bytes checked, bytes in all, "verify:<tensor>")."""
    report = VerifyReport()
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


def _factors64(m: LoraModule, weight: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, s) in float64 such that the layer adds s·(x Aᵀ) Bᵀ: a low-rank module's own factors
    (the layer's path x → A → B, never through :func:`loratools.delta`), other kinds as (I, ΔW)."""
    d = m.delta
    if isinstance(d, LowRank):
        return d.A.double(), d.B.double(), d.scale * weight
    return torch.eye(m.fan_in, dtype=torch.float64), d.matrix(dtype=torch.float64), weight


def forward_check(parts: list[tuple[LoraModule, float]], W: torch.Tensor, merged: torch.Tensor, *, dtype: str,
                  seed: int = 0, n: int = 16) -> TensorCheck:
    """Random inputs through one targeted layer: every adapter that changes it applied un-merged,
    the way the layer runs it (x → A → B per adapter, summed), against the merged weight.

    ``parts``: (module, weight) of each adapter on this tensor (DoRA is always alone on its
    tensor: planning refuses it beside other changes)."""
    g = torch.Generator().manual_seed(seed)
    m = parts[0][0]
    fs = [_factors64(p, w) for p, w in parts]
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
        if dora:  # DoRA: the composed kernel of the two LoRA convs, normed per output channel
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


def check_against(plan: Plan, out: Checkpoint, *, forward: bool = False,
                  progress: Callable[[int, int, str], None] | None = None) -> VerifyReport:
    """Every tensor of ``out`` against what ``plan`` says it must be; missing and extra ones fail."""
    ckpt = plan.base
    report = VerifyReport()
    names = plan.tensors()
    for i, t in enumerate(names, start=1):
        info = out.tensors.get(t.name)
        if info is None:
            report.checks.append(TensorCheck(t.name, t.source.dtype, "FAIL", "missing"))
            continue
        if BY_ST[info.dtype].floating and BY_ST[t.source.dtype].floating:
            t.out_dtype = info.dtype  # MERGED may have been written with --dtype
        elif info.dtype != t.source.dtype:
            report.checks.append(TensorCheck(t.name, info.dtype, "FAIL", "dtype"))
            continue
        report.checks.append(check_tensor(plan, t, info))
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
                report.checks.append(forward_check(parts, ckpt.get(target), out.get(target),
                                                   dtype=out.tensors[target].dtype, seed=len(report.checks)))
    return report
