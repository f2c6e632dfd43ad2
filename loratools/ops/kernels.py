"""The merge kernel: the common case of every merge, unmerge and swap — a floating tensor changed
only by low-rank deltas — done in one pass per row block, at the speed of the machine.

For rows i:j of the stored tensor (viewed as 2-D: rows × everything else):

    S = widen(W[i:j])                      one copy into a cache-sized float32 (float64) buffer
    S += α_k · L_k[i:j] @ R_k   for each k  addmm in place: the scale folded into α, one rounding each
    check min/max of S                      NaN, Inf, or a value the output dtype cannot hold
    out[i:j] = round(S)                     torch's cast, round to nearest even, straight into the
                                            writer's buffer: the one rounding of the result

``L @ R`` is ΔW (or ΔWᵀ for weights stored transposed) in the tensor's storage order, so the error is
the γ-bound of ``ops/edits.py`` (each term a dot product of length r, plus one rounding for α and one
for the sum) — the same bound the verification holds every element to. Everything else (DoRA, biases,
replacements, fp8 outputs) takes the general path of ``ops/execute.py``.
"""

from __future__ import annotations

import math

import torch

from .edits import AddDelta, Compute, Edit

BLOCK_ELEMENTS = 1 << 20  # a row block: 4 MiB of float32, within the last-level cache of any CPU
# outputs whose rounding torch does natively and whose range the min/max check below knows
FAST_OUT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MANTISSA = {torch.float16: (10, 15), torch.bfloat16: (7, 127), torch.float32: (23, 127)}

Term = tuple[torch.Tensor, torch.Tensor, float]  # (L (rows, r), R (r, cols), α)


# fp8: the smallest magnitude beyond the largest finite value's rounding interval. e4m3fn has no
# Inf and its top code is NaN, so its largest value is 448 (not 480); torch's cast *saturates*
# anything larger to ±448 instead of failing, which would be a silent clip: loratools refuses
# values from 464 (448 + half its ulp of 32) on, as it refuses overflow to Inf elsewhere.
_FP8_LIMITS = {torch.float8_e4m3fn: 464.0, torch.float8_e5m2: 61440.0}


def finite_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds (to nearest even) to ±Inf in ``dtype`` (or, for fp8
    e4m3fn, beyond ±448): the largest finite value plus half its ulp; ``inf`` for float64."""
    if dtype in _FP8_LIMITS:
        return _FP8_LIMITS[dtype]
    if dtype not in _MANTISSA:
        return math.inf
    mant, emax = _MANTISSA[dtype]
    return (2.0 - 2.0**-mant) * 2.0**emax + 2.0 ** (emax - mant - 1)


def lowrank_terms(edits: list[Edit], c: Compute) -> list[Term] | None:
    """The edits as addmm terms when every one is a plain low-rank ΔW on the whole tensor, else None."""
    terms: list[Term] = []
    for e in edits:
        if type(e) is not AddDelta or e.window is not None or e.module is None:
            return None
        stored = e.module.stored_factors()
        if stored is None:
            return None
        L, R, scale = stored
        terms.append((L.to(device=c.device, dtype=c.dtype).contiguous(),
                      R.to(device=c.device, dtype=c.dtype).contiguous(), float(e.weight) * scale))
    return terms


def fits(src: torch.Tensor, out_dtype: torch.dtype, c: Compute) -> bool:
    """Whether the kernel can write this tensor: a floating matrix (or more) into a dtype it knows."""
    return (src.dim() >= 2 and src.dtype in FAST_OUT and out_dtype in FAST_OUT and src.numel() > 0
            and c.dtype in (torch.float32, torch.float64))


def rows_per_block(cols: int, itemsize: int, limit_bytes: int) -> int:
    """Rows of a block: about BLOCK_ELEMENTS elements, and no more output bytes than ``limit_bytes``."""
    return max(1, min(BLOCK_ELEMENTS // max(cols, 1), limit_bytes // max(cols * itemsize, 1)))


def apply_block(S: torch.Tensor, W: torch.Tensor, terms: list[Term], i: int, j: int) -> None:
    """S = W[i:j] + Σ α·L[i:j] @ R, in S's dtype (S already has the block's shape)."""
    S.copy_(W)
    for L, R, alpha in terms:
        S.addmm_(L[i:j], R, alpha=alpha)


def apply_products(S: torch.Tensor, W: torch.Tensor, terms: list[Term], i: int, j: int,
                   products: list[torch.Tensor]) -> None:
    """S = W[i:j] + Σ α·P with each P = L[i:j] @ R formed in its own buffer (``products``, kept):
    the kernel of reversible merges and of the exact unmerges that undo them. Taking the terms out
    again is then :func:`remove_products` — the same elementwise additions, so that the values a
    reversible merge stores are exactly those an exact unmerge will not give back."""
    S.copy_(W)
    for (L, R, alpha), P in zip(terms, products):
        torch.mm(L[i:j], R, out=P)
        S.add_(P, alpha=alpha)


def remove_products(S: torch.Tensor, out: torch.Tensor, terms: list[Term], i: int, j: int,
                    products: list[torch.Tensor]) -> None:
    """S = out (widened) − Σ α·P in the order of the terms (rows i:j): what an exact unmerge computes."""
    S.copy_(out)
    for (_, _, alpha), P in zip(terms, products):
        S.add_(P, alpha=-alpha)


def in_range(S: torch.Tensor, limit: float) -> bool:
    """Every value of S finite and below ``limit`` in magnitude (one pass: min and max)."""
    lo, hi = torch.aminmax(S)
    return -limit < float(lo) and float(hi) < limit
