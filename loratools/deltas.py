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

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from .errors import InternalError

__all__ = ["Delta", "LowRank", "Full", "Product", "Hadamard", "Kronecker", "Transform", "Scaling", "Rotation", "InputRotation",
           "InputButterfly", "RowSlice", "RowStack", "Experts"]

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



# --- LyCORIS kinds ---------------------------------------------------------------------------------


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A stored factor as a matrix: rows × everything else (conv kernels flattened, as ΔW is)."""
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True, eq=False)
class Product:
    """One matrix (rows, cols) of a LyCORIS delta, held as the file stores it — so that writers give
    every tensor back unchanged — in one of three forms:

    * whole: ``up`` is the matrix (conv kernels after the first axis flattened into ``cols``);
    * a product ``up @ down``: ``up`` (rows, r), ``down`` (r, cols[, k…]);
    * a Tucker chain (LyCORIS ``use_tucker`` on a conv): ``up`` stored (r, rows) (``up_rows_last``),
      ``down`` (r, in) and ``core`` (r, r, kh, kw):
      M[p, (c, k)] = Σ_ij up[i, p] · core[i, j, k] · down[j, c] — the ``einsum("i j k l, j r, i p
      -> p r k l")`` of LyCORIS and ComfyUI, cols = in·kh·kw.
    """

    up: torch.Tensor
    down: torch.Tensor | None = None
    core: torch.Tensor | None = None

    @property
    def whole(self) -> bool:
        return self.down is None

    @property
    def rows_n(self) -> int:
        return int(self.up.shape[1] if self.core is not None else self.up.shape[0])

    @property
    def cols_n(self) -> int:
        if self.down is None:
            return int(_flat(self.up).shape[1])
        if self.core is not None:
            return int(self.down.shape[1]) * max(1, int(torch.tensor(self.core.shape[2:]).prod()))
        return int(_flat(self.down).shape[1])

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def depth(self) -> int:
        """Products summed per element (a Tucker chain sums twice, and its inner matrix is rounded once)."""
        if self.down is None:
            return 0
        return 2 * int(self.down.shape[0]) + 1 if self.core is not None else int(self.down.shape[0])

    def _inner(self, dtype: torch.dtype, device: Device) -> torch.Tensor:
        """(r, cols) with up-side @ it = the matrix: ``down`` flattened, or core ×₂ down (formed in
        float64, rounded once to ``dtype``)."""
        if self.down is None:
            raise InternalError("a whole Product has no inner factor")
        if self.core is None:
            return _flat(self.down).to(device=device, dtype=dtype)
        inner = torch.einsum("ij...,jc->ic...", self.core.double(), self.down.double())
        return inner.reshape(inner.shape[0], -1).to(device=device, dtype=dtype)

    def _up(self) -> torch.Tensor:
        return self.up.T if self.core is not None else self.up

    def rows(self, i: int, j: int, *, dtype: torch.dtype, device: Device) -> torch.Tensor:
        if self.down is None:
            return _flat(self.up)[i:j].to(device=device, dtype=dtype)
        return self._up()[i:j].to(device=device, dtype=dtype) @ self._inner(dtype, device)

    def take(self, idx: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        if self.down is None:
            return _flat(self.up)[idx].to(dtype)
        return self._up()[idx].to(dtype) @ self._inner(dtype, None)

    def matrix(self, *, dtype: torch.dtype = torch.float64, device: Device = None) -> torch.Tensor:
        return self.rows(0, self.rows_n, dtype=dtype, device=device)

    def abs(self) -> Product:
        return Product(*(None if t is None else t.float().abs() for t in (self.up, self.down, self.core)))

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) float64 with U @ V = the matrix exactly (a whole matrix: itself and an identity on
        its smaller side)."""
        if self.down is not None:
            return self._up().double(), self._inner(torch.float64, None)
        M = _flat(self.up).double()
        if M.shape[0] <= M.shape[1]:
            return torch.eye(M.shape[0], dtype=torch.float64), M
        return M, torch.eye(M.shape[1], dtype=torch.float64)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        named = {"up": self.up, "down": self.down, "core": self.core}
        return {f"{prefix}_{k}": t for k, t in named.items() if t is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Product:
        return Product(*(None if t is None else fn(t) for t in (self.up, self.down, self.core)))

    def transposed(self) -> Product:
        """The transposed matrix as a product (a Tucker chain's inner factor formed in float64)."""
        if self.down is None:
            return Product(_flat(self.up).T)
        U, V = self._up(), self._inner(torch.float64, None)
        return Product(V.T, U.T.to(torch.float64) if U.dtype == torch.float64 else U.T)

    def parameter_count(self) -> int:
        return sum(t.numel() for t in (self.up, self.down, self.core) if t is not None)


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else x * factor


@dataclass(frozen=True, eq=False)
class _Halves(Delta):
    """A delta made of two :class:`Product` halves and a scale (LoHa, LoKr): what they share."""

    W1: Product
    W2: Product
    scale: float
    alpha: float | None = None

    @property
    def depth(self) -> int:
        return self.W1.depth + self.W2.depth + 2

    def magnitude(self) -> Delta:
        return type(self)(self.W1.abs(), self.W2.abs(), abs(float(self.scale)))

    @property
    def T(self) -> Delta:
        return replace(self, W1=self.W1.transposed(), W2=self.W2.transposed())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.W1.tensors("w1"), **self.W2.tensors("w2")}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Delta:
        return replace(self, W1=self.W1.map(fn), W2=self.W2.map(fn))

    def scaled(self, factor: float) -> Delta:
        return replace(self, scale=self.scale * factor)


@dataclass(frozen=True, eq=False)
class Hadamard(_Halves):
    """LyCORIS LoHa: ΔW = scale · (W1) ⊙ (W2), each half a :class:`Product` (w_a @ w_b, or a
    Tucker chain for conv); scale = alpha / r with r the rows of ``hada_w1_b``."""

    kind: ClassVar[str] = "loha"

    @property
    def out_features(self) -> int:
        return self.W1.rows_n

    @property
    def in_features(self) -> int:
        return self.W1.cols_n

    @property
    def rank(self) -> int | None:
        return self.W1.rank

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        left = self.W1.rows(i, j, dtype=dtype, device=device)
        return _scaled(left * self.W2.rows(i, j, dtype=dtype, device=device), float(weight) * float(self.scale))

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        return self.W1.take(idx, dtype) * self.W2.take(idx, dtype) * (float(weight) * float(self.scale))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U1 V1) ⊙ (U2 V2) = (U1 ∗ U2)(V1 ∗ V2): the row-wise and column-wise Khatri–Rao products,
        rank r1·r2 — exact; None when that rank is not below min(out, in)."""
        U1, V1 = self.W1.lowrank()
        U2, V2 = self.W2.lowrank()
        r = U1.shape[1] * U2.shape[1]
        if r >= min(self.out_features, self.in_features):
            return None
        U = (U1[:, :, None] * U2[:, None, :]).reshape(U1.shape[0], r) * float(self.scale)
        V = (V1[:, None, :] * V2[None, :, :]).reshape(r, V1.shape[1])
        return U, V

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                "tucker": self.W1.core is not None, "parameters": self.parameter_count()}


@dataclass(frozen=True, eq=False)
class Kronecker(_Halves):
    """LyCORIS LoKr: ΔW = scale · kron(W1, W2), W1 (a, c) and W2 (b, d·kh·kw), each whole or a
    :class:`Product` (w2 also as a Tucker chain); ΔW is (a·b, c·d·kh·kw) — the conv kernel flattened
    after the input channels, as torch.kron of W1[..., None, None] with a (b, d, kh, kw) W2 lays it
    out. scale = alpha / r (r: rows of the factorized half's ``_b``), 1 when both halves are whole."""

    kind: ClassVar[str] = "lokr"

    @property
    def out_features(self) -> int:
        return self.W1.rows_n * self.W2.rows_n

    @property
    def in_features(self) -> int:
        return self.W1.cols_n * self.W2.cols_n

    @property
    def rank(self) -> int | None:
        return self.W1.rank if self.W1.rank is not None else self.W2.rank

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        b = self.W2.rows_n
        p0, p1 = i // b, -(-j // b)
        w1 = self.W1.rows(p0, p1, dtype=dtype, device=device)
        w2 = self.W2.matrix(dtype=dtype, device=device)
        full = torch.kron(_scaled(w1, float(weight) * float(self.scale)), w2)
        return full[i - p0 * b: j - p0 * b]

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        b = self.W2.rows_n
        w1, w2 = self.W1.take(idx // b, dtype), self.W2.take(idx % b, dtype)
        out = (w1[:, :, None] * w2[:, None, :]).reshape(len(idx), -1)
        return out * (float(weight) * float(self.scale))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """kron(U1 V1, U2 V2) = kron(U1, U2) · kron(V1, V2): exact, rank r1·r2; None when that rank is
        not below min(out, in)."""
        U1, V1 = self.W1.lowrank()
        U2, V2 = self.W2.lowrank()
        if U1.shape[1] * U2.shape[1] >= min(self.out_features, self.in_features):
            return None
        return torch.kron(U1, U2) * float(self.scale), torch.kron(V1, V2)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha, "scale": self.scale,
                "factors": [[self.W1.rows_n, self.W1.cols_n], [self.W2.rows_n, self.W2.cols_n]],
                "parameters": self.parameter_count()}


# --- kinds that are functions of the weight: W' = f(W) ----------------------------------------------


class Transform(Delta):
    """A change that is a function of the weight itself — (IA)³ scaling, OFT/BOFT rotations — so it
    has no ΔW apart from the base: :meth:`apply` maps a stored block of W to W' (``out_axis`` is the
    stored tensor's axis of outputs; ``weight`` interpolates from the identity, as LyCORIS'
    multiplier and ComfyUI's strength do; ``inverse`` undoes it). Merge, unmerge and verify reach
    it through the ``Transform`` edit (ops/edits.py); what needs a ΔW alone (stack, resize,
    --to-lora, formats of factors) refuses it."""

    additive: ClassVar[bool] = False
    whole_rows: ClassVar[bool] = False  # True: the output axis mixes across rows (rotations)

    # the base's shape, filled in at binding (layout._fit_transform): subclasses hold fan_out / fan_in
    @property
    def out_features(self) -> int:
        return int(getattr(self, "fan_out", 0))

    @property
    def in_features(self) -> int:
        return int(getattr(self, "fan_in", 0))

    @abstractmethod
    def apply(self, W: torch.Tensor, *, out_axis: int, weight: float, inverse: bool = False,
              window: tuple[int, int] | None = None, absolute: bool = False) -> torch.Tensor:
        """W' for the stored block W (rows ``window`` of the tensor; None = all). ``absolute``: the
        same map with every coefficient replaced by its absolute value (for error bounds)."""

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        raise InternalError(f"a {self.kind} change has no ΔW apart from the base weight")

    def magnitude(self) -> Delta:
        return self

    @property
    def T(self) -> Delta:
        raise InternalError(f"a {self.kind} change is applied to the stored weight, not transposed")

    def norm(self) -> float:
        return float("nan")  # ‖ΔW‖ depends on the base

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": None, "parameters": self.parameter_count()}


def _along(v: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


@dataclass(frozen=True, eq=False)
class Scaling(Transform):
    """(IA)³: every output (or, ``on_input``, every input column) of W multiplied by a learned
    factor. ``vector`` holds it the way the file does: LyCORIS stores factor − 1 (``offset`` 1),
    PEFT's ``ia3_l`` the factor itself (``offset`` 0). With weight s the factor is 1 + s·(f − 1)."""

    vector: torch.Tensor
    on_input: bool = False
    offset: float = 0.0
    fan_out: int = 0
    fan_in: int = 0  # in_features (in·kh·kw for a conv); the vector has in_channels values
    with_bias: bool = False  # PEFT: factors on outputs scale the layer's bias too

    kind: ClassVar[str] = "ia3"

    @property
    def depth(self) -> int:
        return 2

    def factor(self, weight: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        f = self.vector.reshape(-1).to(torch.float64) + self.offset
        return (1.0 + float(weight) * (f - 1.0)).to(dtype)

    def apply(self, W: torch.Tensor, *, out_axis: int, weight: float, inverse: bool = False,
              window: tuple[int, int] | None = None, absolute: bool = False) -> torch.Tensor:
        f = self.factor(weight, torch.float64)
        if inverse:
            f = 1.0 / f
        if absolute:
            f = f.abs()
        axis = (1 - out_axis) if self.on_input else out_axis
        if axis == 0 and window is not None:
            f = f[window[0]:window[1]]
        return W * _along(f.to(device=W.device, dtype=W.dtype), W.dim(), axis)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vector": self.vector}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Scaling:
        return replace(self, vector=fn(self.vector))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": None, "on_input": self.on_input, "parameters": self.parameter_count()}


def cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS' orthogonal blocks, in float64: Q = B − Bᵀ (scaled to norm ``constraint`` when
    ‖Q‖ + 1e-8 exceeds it, over all blocks together), R = (I + Q)(I − Q)⁻¹."""
    B = blocks.to(torch.float64)
    q = B - B.transpose(-1, -2)
    if constraint > 0:
        norm = float(torch.linalg.vector_norm(q)) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(B.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


@dataclass(frozen=True, eq=False)
class Rotation(Transform):
    """OFT / BOFT (LyCORIS): W's output rows rotated by block-diagonal orthogonal matrices from the
    Cayley transform of ``blocks``. OFT: ``blocks`` (n, b, b), W'_k = M_kᵀ W_k for each block k of
    b output rows. BOFT: ``blocks`` (m, n, b, b), m butterfly stages, stage i shuffling rows in groups
    of 2^i·b/2 before its block-diagonal M (W ← M W), as LyCORIS' ``boft.diff_weight``. With weight
    s each M = s·R + (1 − s)·I; ``rescale`` (out,) multiplies the result per output; ``constraint``
    is LyCORIS' alpha · out_features (0: none)."""

    blocks: torch.Tensor
    constraint: float = 0.0
    rescale: torch.Tensor | None = None
    fan_in: int = 0
    alpha: float = 0.0  # the file's own value

    kind: ClassVar[str] = "oft"
    whole_rows: ClassVar[bool] = True

    @property
    def butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @property
    def out_features(self) -> int:
        return int(self.blocks.shape[-3]) * int(self.blocks.shape[-1])

    @property
    def in_features(self) -> int:
        return self.fan_in

    @property
    def depth(self) -> int:
        stages = int(self.blocks.shape[0]) if self.butterfly else 1
        return stages * (int(self.blocks.shape[-1]) + 1) + 2

    def matrices(self, weight: float, inverse: bool, absolute: bool) -> torch.Tensor:
        R = cayley(self.blocks, self.constraint)
        if weight != 1.0:
            R = R * weight + (1.0 - weight) * torch.eye(R.shape[-1], dtype=torch.float64)
        if inverse:
            R = torch.linalg.inv(R)
        return R.abs() if absolute else R

    def apply(self, W: torch.Tensor, *, out_axis: int, weight: float, inverse: bool = False,
              window: tuple[int, int] | None = None, absolute: bool = False) -> torch.Tensor:
        if window is not None and (window[0] != 0 or window[1] != W.shape[0]) and out_axis == 0:
            raise InternalError("a rotation of output rows needs every row at once")
        R = self.matrices(weight, inverse, absolute).to(device=W.device, dtype=W.dtype)
        X = W if out_axis == 0 else W.transpose(0, 1)
        shape = X.shape
        if self.rescale is not None and inverse:
            r = self.rescale.reshape(-1).to(device=W.device, dtype=torch.float64)
            X = X / _along((r.abs() if absolute else r).to(W.dtype), X.dim(), 0)
        if self.butterfly:
            X = _butterfly(X, R, inverse)
        else:
            n, b = R.shape[0], R.shape[-1]  # W'_k = R_kᵀ W_k, and W_k = (R_k⁻¹)ᵀ W'_k
            X = torch.einsum("knm,kn...->km...", R, X.reshape(n, b, *shape[1:])).reshape(shape)
        if self.rescale is not None and not inverse:
            r = self.rescale.reshape(-1).to(device=W.device, dtype=W.dtype)
            X = X * _along(r.abs() if absolute else r, X.dim(), 0)
        return X if out_axis == 0 else X.transpose(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks, **({"rescale": self.rescale} if self.rescale is not None else {})}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Rotation:
        return replace(self, blocks=fn(self.blocks), rescale=None if self.rescale is None else fn(self.rescale))

    def describe(self) -> dict[str, Any]:
        return {"kind": "boft" if self.butterfly else "oft", "rank": None, "block_size": int(self.blocks.shape[-1]),
                "constraint": self.constraint, "parameters": self.parameter_count()}


def _butterfly(X: torch.Tensor, R: torch.Tensor, inverse: bool) -> torch.Tensor:
    """LyCORIS' BOFT stages on the rows of X (R: (m, n, b, b), already inverted when ``inverse``,
    in which case the stages run in reverse order)."""
    m, _, b, _ = R.shape
    half = b // 2
    stages = range(m - 1, -1, -1) if inverse else range(m)
    for i in stages:
        k = 2**i * half
        X = X.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        X = torch.einsum("bij,bj...->bi...", R[i], X)
        X = X.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return X


def _neumann_cayley(Q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's Cayley–Neumann series R ≈ I + 2Q + 2Q² + … + 2Q^(n−2) + Q^(n−1) (``terms`` = n), or
    the exact Cayley transform (I − Q)(I + Q)⁻¹ when ``terms`` is 0 — PEFT's
    ``OFTRotationModule._cayley_batch``, in float64."""
    eye = torch.eye(Q.shape[-1], dtype=torch.float64).expand_as(Q)
    if terms <= 0:
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    R = eye.clone()
    if terms > 1:
        R = R + 2.0 * Q
        if terms > 2:
            power = Q @ Q
            R = R + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ Q
                R = R + 2.0 * power
            R = R + power @ Q
    return R


@dataclass(frozen=True, eq=False)
class InputRotation(Transform):
    """PEFT's OFT: the inputs rotated by a block-diagonal M of ``b``×``b`` blocks, W' = W·Mᵀ (a
    conv's flattened in·kh·kw inputs), each block from the upper-triangle vector of a skew matrix
    Q through PEFT's Cayley–Neumann series (``terms``; 0: the exact Cayley transform);
    ``block_share``: one block for all. With weight s, M = s·M + (1 − s)·I."""

    vectors: torch.Tensor  # (blocks, b(b−1)/2) as PEFT stores oft_R.weight
    block_size: int
    terms: int = 5
    block_share: bool = False
    fan_out: int = 0
    fan_in: int = 0

    kind: ClassVar[str] = "peft_oft"  # not LyCORIS' "oft": another parametrization, on the inputs

    @property
    def depth(self) -> int:
        return self.block_size + 2

    def blocks(self, weight: float, inverse: bool, absolute: bool) -> torch.Tensor:
        b = self.block_size
        rows, cols = torch.triu_indices(b, b, 1)
        v = self.vectors.to(torch.float64)
        Q = torch.zeros(v.shape[0], b, b, dtype=torch.float64)
        Q[:, rows, cols] = v
        Q = Q - Q.transpose(-1, -2)
        M = _neumann_cayley(Q, self.terms)
        if weight != 1.0:
            M = M * weight + (1.0 - weight) * torch.eye(b, dtype=torch.float64)
        if inverse:
            M = torch.linalg.inv(M)
        if self.block_share and self.fan_in:
            M = M.expand(self.fan_in // b, b, b)
        return M.abs() if absolute else M

    def apply(self, W: torch.Tensor, *, out_axis: int, weight: float, inverse: bool = False,
              window: tuple[int, int] | None = None, absolute: bool = False) -> torch.Tensor:
        if out_axis != 0:
            raise InternalError("PEFT OFT on a base stored (in, out) is not supported")
        M = self.blocks(weight, inverse, absolute).to(device=W.device, dtype=W.dtype)
        n, b = M.shape[0], self.block_size
        X = W.reshape(W.shape[0], n, b)
        return torch.einsum("rnk,nck->rnc", X, M).reshape(W.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"vectors": self.vectors}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> InputRotation:
        return replace(self, vectors=fn(self.vectors))

    def describe(self) -> dict[str, Any]:
        return {"kind": "peft_oft", "rank": None, "block_size": self.block_size, "cayley_neumann_terms": self.terms,
                "parameters": self.parameter_count()}


def butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """PEFT's ``BOFTLayer.block_butterfly_perm``: the index permutation of one butterfly stage."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise InternalError("invalid number of butterfly blocks")
    block = n // b
    step = block / r
    order = torch.arange(block)
    sorted_order = torch.empty(block, dtype=torch.long)
    sequence = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    for i, pos in enumerate(sequence):
        sorted_order[int(i * r): int(i * r + r)] = order[int(pos * r): int(pos * r + r)]
    indices = torch.arange(n)
    for i in range(0, n, block):
        indices[i:i + block] = indices[i:i + block][sorted_order]
    return indices


@dataclass(frozen=True, eq=False)
class InputButterfly(Transform):
    """PEFT's BOFT: the inputs rotated by a product of butterfly stages, W' = (W · Mᵀ) ⊙ s with
    M = B_{m−1} ⋯ B_0, B_i = P_i · blockdiag(C_i) · P_iᵀ, C_i = (I − S)(I + S)⁻¹ for S = (R − Rᵀ)/2
    (``boft_R`` (m, n, b, b)), P_i PEFT's butterfly permutations of the layer's inputs, ``boft_s``
    one factor per output. With weight s each C ← s·C + (1 − s)·I and each factor 1 + s·(f − 1)."""

    blocks: torch.Tensor  # boft_R (m, n, b, b)
    scale: torch.Tensor  # boft_s, one value per output
    fan_out: int = 0
    fan_in: int = 0

    kind: ClassVar[str] = "peft_boft"

    @property
    def depth(self) -> int:
        return int(self.blocks.shape[0]) * (int(self.blocks.shape[-1]) + 1) + 2

    def apply(self, W: torch.Tensor, *, out_axis: int, weight: float, inverse: bool = False,
              window: tuple[int, int] | None = None, absolute: bool = False) -> torch.Tensor:
        if out_axis != 0:
            raise InternalError("PEFT BOFT on a base stored (in, out) is not supported")
        m, n, b, _ = self.blocks.shape
        R = self.blocks.to(torch.float64)
        S = 0.5 * (R - R.transpose(-1, -2)).reshape(m * n, b, b)
        eye = torch.eye(b, dtype=torch.float64).expand_as(S)
        C = torch.linalg.solve(eye + S, eye - S, left=False).reshape(m, n, b, b)
        if weight != 1.0:
            C = C * weight + (1.0 - weight) * torch.eye(b, dtype=torch.float64)
        if inverse:
            C = torch.linalg.inv(C)
        if absolute:
            C = C.abs()
        f = 1.0 + float(weight) * (self.scale.reshape(-1).to(torch.float64) - 1.0)
        if window is not None:
            f = f[window[0]:window[1]]
        f = (f.abs() if absolute else f).to(device=W.device, dtype=W.dtype)
        C = C.to(device=W.device, dtype=W.dtype)
        X = W.reshape(W.shape[0], -1)
        if inverse:
            X = X / f[:, None]
        stages = range(m - 1, -1, -1) if inverse else range(m)
        for i in stages:
            perm = butterfly_perm(self.fan_in, n // 2**i, b // 2, m - 1).to(W.device)
            X = X[:, torch.argsort(perm)]
            X = torch.einsum("rnk,nck->rnc", X.reshape(X.shape[0], n, b), C[i]).reshape(X.shape)
            X = X[:, perm]
        if not inverse:
            X = X * f[:, None]
        return X.reshape(W.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks, "scale": self.scale}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> InputButterfly:
        return replace(self, blocks=fn(self.blocks), scale=fn(self.scale))

    def describe(self) -> dict[str, Any]:
        return {"kind": "peft_boft", "rank": None, "block_size": int(self.blocks.shape[-1]),
                "stages": int(self.blocks.shape[0]), "parameters": self.parameter_count()}


# --- pieces of a delta: one model's fused projection carried to its split layout and back ---------


@dataclass(frozen=True, eq=False)
class RowSlice(Delta):
    """Rows ``start:stop`` of another delta's ΔW — a module on a fused projection (Flux's qkv)
    applied to one of the split tensors, for kinds that cannot simply cut a factor (LoHa, LoKr,
    full diffs). Exact: the same elements, computed the same way."""

    inner: Delta
    start: int
    stop: int

    kind: ClassVar[str] = "slice"

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        return self.inner.in_features

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def depth(self) -> int:
        return self.inner.depth

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        return self.inner.rows(self.start + i, self.start + j, dtype=dtype, device=device, weight=weight)

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        return self.inner.take_rows(idx + self.start, dtype=dtype, weight=weight)

    def magnitude(self) -> RowSlice:
        return replace(self, inner=self.inner.magnitude())

    @property
    def T(self) -> Delta:
        raise InternalError("a row slice of a delta is applied to (out, in) storage only")

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.inner.tensors()

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RowSlice:
        return replace(self, inner=self.inner.map(fn))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        f = self.inner.factors()
        return None if f is None else (f[0][self.start:self.stop], f[1])

    def scaled(self, factor: float) -> RowSlice:
        return replace(self, inner=self.inner.scaled(factor))

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "rows": [self.start, self.stop]}


@dataclass(frozen=True, eq=False)
class RowStack(Delta):
    """Deltas of split projections stacked by rows into one fused tensor's ΔW (zeros where no part
    is): ``parts`` are (first row, delta). Exact: each element is its part's own."""

    parts: tuple[tuple[int, Delta], ...]
    total: int

    kind: ClassVar[str] = "stack"

    @property
    def out_features(self) -> int:
        return self.total

    @property
    def in_features(self) -> int:
        return self.parts[0][1].in_features

    @property
    def rank(self) -> int | None:
        return None

    @property
    def depth(self) -> int:
        return max(d.depth for _, d in self.parts)

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        out = torch.zeros(j - i, self.in_features, dtype=dtype, device=device)
        for off, d in self.parts:
            a, b = max(i, off), min(j, off + d.out_features)
            if a < b:
                out[a - i:b - i] = d.rows(a - off, b - off, dtype=dtype, device=device, weight=weight)
        return out

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        out = torch.zeros(len(idx), self.in_features, dtype=dtype)
        for off, d in self.parts:
            mask = (idx >= off) & (idx < off + d.out_features)
            if bool(mask.any()):
                out[mask] = d.take_rows(idx[mask] - off, dtype=dtype, weight=weight)
        return out

    def magnitude(self) -> RowStack:
        return replace(self, parts=tuple((o, d.magnitude()) for o, d in self.parts))

    @property
    def T(self) -> Delta:
        raise InternalError("stacked deltas are applied to (out, in) storage only")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{n}.{k}": t for n, (_, d) in enumerate(self.parts) for k, t in d.tensors().items()}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> RowStack:
        return replace(self, parts=tuple((o, d.map(fn)) for o, d in self.parts))

    def scaled(self, factor: float) -> RowStack:
        return replace(self, parts=tuple((o, d.scaled(factor)) for o, d in self.parts))

    def describe(self) -> dict[str, Any]:
        return {"kind": "stack", "rank": None, "parts": [d.describe() for _, d in self.parts],
                "parameters": self.parameter_count()}


@dataclass(frozen=True, eq=False)
class Experts(Delta):
    """One low-rank ΔW per expert of a fused expert tensor stored (E, d1, d2) — gpt-oss's
    ``experts.gate_up_proj`` (E, H, 2I) as it is on disk: expert e's ΔW_e = scale · B[e] @ A[e]
    with A (E, r, in) and B (E, out, r). As a matrix it is (E, d1·d2): row e is expert e's ΔW in
    the stored layout, flattened — ``transposed`` when the tensor stores (in, out) per expert
    (PEFT's ``is_transposed``: x @ W[e]), so stored = ΔW_eᵀ."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transposed: bool = False
    alpha: float | None = None

    kind: ClassVar[str] = "experts"

    @property
    def experts(self) -> int:
        return int(self.A.shape[0])

    @property
    def out_features(self) -> int:
        return self.experts

    @property
    def in_features(self) -> int:
        return int(self.A.shape[2]) * int(self.B.shape[1])

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])

    @property
    def depth(self) -> int:
        return self.rank

    @property
    def stored(self) -> tuple[int, int]:
        """(d1, d2) of one expert as stored."""
        o, i = int(self.B.shape[1]), int(self.A.shape[2])
        return (i, o) if self.transposed else (o, i)

    def _product(self, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, device: Device,
                 weight: float) -> torch.Tensor:
        A, B = A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)
        factor = float(weight) * float(self.scale)
        if A.numel() <= B.numel():
            A = A * factor
        else:
            B = B * factor
        d = torch.bmm(B, A)
        return (d.transpose(1, 2) if self.transposed else d).reshape(len(d), -1)

    def rows(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: Device = None,
             weight: float = 1.0) -> torch.Tensor:
        return self._product(self.A[i:j], self.B[i:j], dtype, device, weight)

    def take_rows(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0) -> torch.Tensor:
        return self._product(self.A[idx], self.B[idx], dtype, None, weight)

    def magnitude(self) -> Experts:
        return replace(self, A=self.A.float().abs(), B=self.B.float().abs(), scale=abs(float(self.scale)))

    @property
    def T(self) -> Delta:
        raise InternalError("expert deltas are applied to their fused (E, d1, d2) storage only")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Experts:
        return replace(self, A=fn(self.A), B=fn(self.B))

    def scaled(self, factor: float) -> Experts:
        return replace(self, scale=self.scale * factor)

    def expert(self, e: int) -> LowRank:
        """Expert e's ΔW (out, in) as a LowRank delta."""
        return LowRank(self.A[e], self.B[e], self.scale, self.alpha)

    def norm(self) -> float:
        return math.sqrt(sum(self.expert(e).norm() ** 2 for e in range(self.experts)))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "rank": self.rank, "experts": self.experts, "alpha": self.alpha,
                "scale": self.scale, "parameters": self.parameter_count()}
