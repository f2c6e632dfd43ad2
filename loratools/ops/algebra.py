"""The algebra of low-rank deltas — pure math, no I/O.

Everything works on a module's canonical matrix M = scale · B @ A of shape (fan_out, fan_in), never
on A and B separately (combining A's and B's separately adds cross terms Bᵢ Aⱼ).

* :func:`concat` — exact: [w₁s₁B₁ | w₂s₂B₂ …] @ [A₁; A₂ …], ranks add up.
* :func:`factorize_lowrank` — the best rank-R approximation of B @ A without forming the
  (fan_out × fan_in) matrix: QR of B and of Aᵀ, SVD of the small (k × k) core. Its error equals the
  Eckart–Young bound √(Σ_{j>R} σⱼ²).
* :func:`factorize_dense` — the same for a dense matrix (TIES / DARE results, extract).
* :func:`ties`, :func:`dare_linear`, :func:`dare_ties`, :func:`magnitude_prune` — the definitions
  of ``peft.utils.merge_utils`` applied to whole ΔW matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """B (fan_out, k) @ A (k, fan_in), with the singular values when they are known."""

    B: torch.Tensor
    A: torch.Tensor
    singular_values: torch.Tensor | None = None
    discarded_energy: float = 0.0  # Σ σ² of what was cut
    total_energy: float = 0.0  # Σ σ² of the whole matrix
    randomized: bool = False  # found by a randomized range finder (factorize_dense)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def relative_error(self) -> float:
        """‖M − M_R‖_F / ‖M‖_F (Eckart–Young)."""
        return (self.discarded_energy / self.total_energy) ** 0.5 if self.total_energy > 0 else 0.0


def concat(terms: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat, A_cat) with Σ coefᵢ·Bᵢ@Aᵢ = B_cat @ A_cat; each coefficient is folded into its B."""
    B = torch.cat([b * c for b, _, c in terms], dim=1)
    A = torch.cat([a for _, a, _ in terms], dim=0)
    return B, A


def choose_rank(s: torch.Tensor, *, rank: int | None, energy: float | None) -> int:
    """The kept rank: at most ``rank``; with ``energy`` the smallest k with Σ_{j≤k} σⱼ² ≥ energy·Σσ²."""
    k = int(s.numel())
    if energy is not None:
        e = (s.double() ** 2).cumsum(0)
        total = float(e[-1]) if e.numel() else 0.0
        if total > 0:
            k = int(torch.searchsorted(e, torch.tensor(energy * total, dtype=torch.float64) * (1 - 1e-12)).item()) + 1
            k = min(k, int(s.numel()))
    if rank is not None:
        k = min(k, rank)
    return max(k, 1) if s.numel() else 0


def _split(U: torch.Tensor, s: torch.Tensor, Vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = s[:k].sqrt()
    return U[:, :k] * root, root[:, None] * Vh[:k]


def factorize_lowrank(B: torch.Tensor, A: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                      dtype: torch.dtype = torch.float64) -> Factors:
    """Best rank-R approximation of B @ A (B (o, k), A (k, i)) in ``dtype``, never forming o × i."""
    B = B.to(dtype)
    A = A.to(dtype)
    Qb, Rb = torch.linalg.qr(B)  # (o, p), (p, k)
    Qa, Ra = torch.linalg.qr(A.T)  # (i, q), (q, k)
    core = Rb @ Ra.T  # (p, q): B @ A = Qb core Qaᵀ
    U, s, Vh = torch.linalg.svd(core, full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy)
    Bk, Ak = _split(Qb @ U, s, Vh @ Qa.T, k)
    energy_all = float((s.double() ** 2).sum())
    return Factors(Bk, Ak, s, float((s[k:].double() ** 2).sum()), energy_all)


RANDOMIZED_MIN_SIDE = 256  # below this a full SVD is cheap anyway
RANDOMIZED_MAX_FRACTION = 1 / 8  # a rank above this fraction of the short side gains nothing


def factorize_dense(M: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
                    dtype: torch.dtype = torch.float32, randomized: bool = True) -> Factors:
    """Best rank-R approximation of a dense matrix.

    A full SVD in ``dtype``, or — for a requested rank well below the matrix's size — a
    randomized range finder with power iterations (Halko–Martinsson–Tropp, ``torch.svd_lowrank``):
    the factors are the projection of M onto the subspace found, so the discarded energy
    ‖M‖² − Σσ̃ᵢ² is exact for what is returned (and ≥ the Eckart–Young optimum, by a margin the
    tests bound); ``Factors.randomized`` says which was used."""
    short = min(M.shape)
    if (randomized and energy is None and rank is not None and short >= RANDOMIZED_MIN_SIDE
            and rank <= short * RANDOMIZED_MAX_FRACTION):
        X = M.to(dtype)
        with torch.random.fork_rng(devices=[]):  # the user's random state is left alone
            torch.manual_seed(0)  # the same input gives the same adapter
            U, s, V = torch.svd_lowrank(X, q=min(short, rank + 16), niter=4)
        k = min(rank, int(s.numel()))
        Bk, Ak = U[:, :k] * s[:k], V[:, :k].T.contiguous()
        total = float((X.double() ** 2).sum())
        kept = float((s[:k].double() ** 2).sum())
        f = Factors(Bk.contiguous(), Ak, s[:k], max(0.0, total - kept), total)
        f.randomized = True
        return f
    U, s, Vh = torch.linalg.svd(M.to(dtype), full_matrices=False)
    k = choose_rank(s, rank=rank, energy=energy)
    Bk, Ak = _split(U, s, Vh, k)
    return Factors(Bk, Ak, s, float((s[k:].double() ** 2).sum()), float((s.double() ** 2).sum()))


# --- TIES / DARE, following peft.utils.merge_utils, on whole ΔW matrices ---------------------------


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest |values| (ties broken as torch.topk does)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def random_mask(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each value with probability density, rescale by 1/density."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def _stack_weighted(tasks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    stacked = torch.stack(tasks, dim=0)
    return stacked * torch.tensor(weights, dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))


def _ties_combine(pruned: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Elect each entry's sign from the sum of the pruned (unweighted) deltas, then average the
    weighted deltas that agree with it (divided by how many agree) — as peft's merge_utils does."""
    stacked = torch.stack(pruned, dim=0)
    majority = torch.where(stacked.sum(dim=0) >= 0, 1, -1)
    agree = stacked.sign() == majority
    weighted = _stack_weighted(pruned, weights)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def linear(tasks: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return _stack_weighted(tasks, weights).sum(dim=0)


def magnitude_prune(tasks: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    return _stack_weighted([magnitude_mask(t, density) for t in tasks], weights).sum(dim=0)


def ties(tasks: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    return _ties_combine([magnitude_mask(t, density) for t in tasks], weights)


def dare_linear(tasks: list[torch.Tensor], weights: list[float], density: float, generator: torch.Generator) -> torch.Tensor:
    return _stack_weighted([random_mask(t, density, generator) for t in tasks], weights).sum(dim=0)


def dare_ties(tasks: list[torch.Tensor], weights: list[float], density: float, generator: torch.Generator) -> torch.Tensor:
    return _ties_combine([random_mask(t, density, generator) for t in tasks], weights)
