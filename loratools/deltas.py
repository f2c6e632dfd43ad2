"""Delta kinds: what one adapter module changes in one base tensor, as math.

A :class:`Delta` is ΔW as a matrix in the canonical orientation, ``(out_features, in_features)``
— for a conv ``in_features = in_channels·kh·kw``, for an embedding ``(dim, vocab)`` —, whatever
the tensors behind it. Everything that merges, unmerges, swaps, stacks, verifies or writes asks
the delta, never its tensors:

* ``rows(i, j)`` / ``cols(i, j)``: ΔW for a block of rows (or columns, for bases stored
  transposed), formed in the requested dtype on the requested device with one rounding per
  element of the product (the factor ``weight`` is folded in before the product);
* ``magnitude()``: a delta of the same kind whose ΔW bounds the absolute value of every term the
  product sums, and ``depth``, how many terms that is: the two numbers a float32 error bound needs;
* ``T``: the delta of ΔWᵀ; ``factors()``: exact low-rank factors (float64) when the kind has
  them, for stacking; ``describe()``: what ``info`` shows; ``tensors()`` / ``map()``: the
  tensors behind it, for finiteness checks and dtype changes.

A new kind (LoHa, LoKr, …) is one subclass here plus the readers and writers of the formats that
hold it (``formats/*`` declare which kinds they hold). Plan, execute, verify and the pipeline
need no change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

__all__ = ["Delta", "LowRank", "Full"]

Device = torch.device | str | None


class Delta(ABC):
    """ΔW of one module, ``(out_features, in_features)``. Subclasses are frozen dataclasses."""

    kind: ClassVar[str]

    @property
    @abstractmethod
    def out_features(self) -> int: ...

    @property
    @abstractmethod
    def in_features(self) -> int: ...

    @property
    def rank(self) -> int | None:
        """The rank the format stores (None for kinds without one)."""
        return None

    @property
    @abstractmethod
    def depth(self) -> int:
        """How many products each element of ΔW sums (a float32 dot product of that length)."""

    @abstractmethod
    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        """weight · ΔW[i:j, :] in ``dtype`` on ``device``."""

    def cols(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        """weight · ΔW[:, i:j]."""
        return self.T.rows(i, j, dtype=dtype, device=device, weight=weight).T

    def matrix(self, *, dtype: torch.dtype = torch.float32, device: Device = None, weight: float = 1.0) -> torch.Tensor:
        return self.rows(0, self.out_features, dtype=dtype, device=device, weight=weight)

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        """weight · ΔW[idx, :] for any row indices (kinds with factors override it: one product)."""
        if len(idx) == 0:
            return torch.zeros(0, self.in_features, dtype=dtype)
        return torch.cat([self.rows(int(i), int(i) + 1, dtype=dtype, weight=weight) for i in idx])

    @abstractmethod
    def magnitude(self) -> Delta:
        """A delta whose ΔW bounds |each term| of this one's products (all entries ≥ 0)."""

    @property
    @abstractmethod
    def T(self) -> Delta:
        """The delta of ΔWᵀ."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors behind the delta, by role."""

    @abstractmethod
    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Delta:
        """The same kind with ``fn`` applied to every tensor (dtype changes, device moves)."""

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def norm(self) -> float:
        """‖ΔW‖_F in float64 (kinds with a cheaper exact formula override it)."""
        return float(torch.linalg.vector_norm(self.matrix(dtype=torch.float64)))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) in float64 with ΔW = B @ A exactly, or None when the kind has no low-rank form."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "parameters": self.parameter_count()}

    def scaled(self, factor: float) -> Delta:
        """factor · ΔW (exact: only a scale changes)."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class LowRank(Delta):
    """ΔW = scale · B @ A with A (r, in_features) and B (out_features, r); ``alpha`` is what the
    source format stored (kept so that writers reproduce it)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None

    kind: ClassVar[str] = "lowrank"

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def depth(self) -> int:
        return self.rank

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        A = self.A.to(device=device, dtype=dtype)
        B = self.B[i:j].to(device=device, dtype=dtype)
        factor = float(weight) * float(self.scale)
        if A.numel() <= B.numel():  # the factor goes on the smaller operand: one rounding fewer elements
            A = A * factor
        else:
            B = B * factor
        return B @ A

    def cols(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        return replace(self, A=self.A[:, i:j]).matrix(dtype=dtype, device=device, weight=weight)

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        return (self.B[idx].to(dtype) @ self.A.to(dtype)) * (float(weight) * float(self.scale))

    def magnitude(self) -> LowRank:
        return LowRank(self.A.float().abs(), self.B.float().abs(), abs(float(self.scale)))

    @property
    def T(self) -> LowRank:
        return replace(self, A=self.B.T, B=self.A.T)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> LowRank:
        return replace(self, A=fn(self.A), B=fn(self.B))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.B.double() * float(self.scale), self.A.double()

    def norm(self) -> float:
        """‖s·B@A‖_F = |s|·sqrt(Σ (BᵀB) ⊙ (AAᵀ)) from r×r matrices — or from the product itself when
        that is smaller (r² > out·in): neither is ever larger than the factors justify."""
        A, B = self.A.double(), self.B.double()
        if self.rank ** 2 > self.out_features * self.in_features:
            return abs(float(self.scale)) * float(torch.linalg.vector_norm(B @ A))
        return abs(float(self.scale)) * float(((B.T @ B) * (A @ A.T)).sum().clamp_min(0.0).sqrt())

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                "parameters": self.parameter_count()}

    def scaled(self, factor: float) -> LowRank:
        return replace(self, scale=self.scale * factor)

    def with_scale(self, scale: float) -> LowRank:
        """The same ΔW with ``scale``: the ratio folded into B (one rounding of B in its dtype)."""
        if self.scale == scale:
            return self
        ratio = self.scale / scale
        B = (self.B.double() * ratio).to(self.B.dtype) if self.B.dtype != torch.float64 else self.B * ratio
        return replace(self, B=B, scale=scale, alpha=scale * self.rank)

    def padded(self, rank: int) -> LowRank:
        """Zero rows in A and columns in B up to ``rank``: ΔW unchanged."""
        extra = rank - self.rank
        if extra <= 0:
            return self
        A = torch.cat([self.A, torch.zeros(extra, self.A.shape[1], dtype=self.A.dtype)], dim=0)
        B = torch.cat([self.B, torch.zeros(self.B.shape[0], extra, dtype=self.B.dtype)], dim=1)
        return replace(self, A=A, B=B)


@dataclass(frozen=True, eq=False)
class Full(Delta):
    """ΔW stored whole: ``W`` (out_features, in_features) times ``scale`` (full-weight diffs)."""

    W: torch.Tensor
    scale: float = 1.0

    kind: ClassVar[str] = "full"

    @property
    def out_features(self) -> int:
        return int(self.W.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.W.shape[1])

    @property
    def depth(self) -> int:
        return 1

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        return self.W[i:j].to(device=device, dtype=dtype) * (float(weight) * float(self.scale))

    def magnitude(self) -> Full:
        return Full(self.W.float().abs(), abs(float(self.scale)))

    @property
    def T(self) -> Full:
        return replace(self, W=self.W.T)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"W": self.W}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Full:
        return replace(self, W=fn(self.W))

    def scaled(self, factor: float) -> Full:
        return replace(self, scale=self.scale * factor)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": None, "scale": self.scale, "parameters": self.parameter_count()}

