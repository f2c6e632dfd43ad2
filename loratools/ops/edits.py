"""Edits: what happens to one base tensor, as small typed objects.

An :class:`Edit` knows how to apply itself to a block of rows of the tensor (``apply``), how to
restrict itself to such a block (``slice``), the edit that takes it out again (``inverse``), and
its contribution to the float32 error bound (``grow_bound``) — everything a kind of change means
kept in one class, the way PEFT keeps a LoRA variant's merge and unmerge together. Plans hold
lists of edits; execute and verify call these methods and never ask which class they have.

The kinds: :class:`AddDelta` (W += w·ΔW), :class:`Dora` (W = m ⊙ (W+ΔW)/‖W+ΔW‖),
:class:`DoraUndo` (its inverse, given the stored norms), :class:`AddBias` (b += w·s·lora_B.bias),
:class:`Apply` (W = f(W): (IA)³, OFT/BOFT) and :class:`Replace` (W = tensor: ``modules_to_save``,
or the original restored).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch

from ..adapter import LoraModule
from ..errors import InternalError

U32 = 2.0**-24  # unit roundoff of float32


@dataclass(frozen=True)
class Compute:
    """Where and in what precision edits compute; ``norms`` collects DoRA's ‖W+ΔW‖ for undo data."""

    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    norms: list[torch.Tensor] | None = None


@dataclass(frozen=True, eq=False)
class Edit(ABC):
    """One change to one tensor by adapter number ``adapter`` (an index into the plan's inputs),
    with signed ``weight`` (negative: taken out). ``window`` is the block of stored rows (i, j)
    the edit has been sliced to; None means the whole tensor."""

    adapter: int
    weight: float
    window: tuple[int, int] | None = None

    label = "edit"
    replaces = False  # the value before this edit does not matter

    @property
    def whole(self) -> bool:
        """True when the edit needs every row at once (a norm across rows)."""
        return False

    @abstractmethod
    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        """The block W (compute dtype, on the device) after this edit."""

    @abstractmethod
    def _rows(self, i: int, j: int) -> Edit:
        """This edit restricted to stored rows i:j (tensors it carries sliced)."""

    def slice(self, i: int, j: int) -> Edit:
        return self._rows(i, j)

    @abstractmethod
    def inverse(self, *, norm: torch.Tensor | None, original: torch.Tensor) -> Edit:
        """The edit that takes this one out again (``norm``: the DoRA norms the merge recorded,
        ``original``: the tensor before a replacement)."""

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        """(bound on the magnitude of the terms summed so far, float32; products summed per element)."""
        return mag, 0

    def bound_override(self, ref: torch.Tensor) -> torch.Tensor | None:
        """A whole-result bound for edits whose error is not a sum of products (DoRA's norm)."""
        return None

    def describe(self, who: str) -> str:
        return f"{self.label} from {who} (weight {self.weight:g})"


def _window(e: Edit, i: int, j: int) -> tuple[int, int]:
    base = e.window[0] if e.window else 0
    return base + i, base + j


@dataclass(frozen=True, eq=False)
class AddDelta(Edit):
    """W += weight · ΔW of ``module``."""

    module: LoraModule | None = None
    label = "ΔW"

    def _m(self) -> LoraModule:
        if self.module is None:
            raise InternalError("an AddDelta edit without a module")
        return self.module

    def _span(self, W: torch.Tensor) -> tuple[int, int]:
        return self.window or (0, W.shape[0])

    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        i, j = self._span(W)
        return W + self._m().block(i, j, dtype=c.dtype, device=c.device, weight=self.weight)

    def _rows(self, i: int, j: int) -> Edit:
        return replace(self, window=_window(self, i, j))

    def inverse(self, *, norm: torch.Tensor | None, original: torch.Tensor) -> Edit:
        return replace(self, weight=-self.weight)

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        i, j = self._span(mag)
        return mag + self._m().block(i, j, weight=self.weight, magnitude=True), self._m().delta.depth

    def describe(self, who: str) -> str:
        m = self._m()
        rank = f" r={m.rank}" if m.rank is not None else f" ({m.delta.kind})"
        return f"ΔW{rank} from {who} (weight {self.weight:g})"


@dataclass(frozen=True, eq=False)
class Dora(AddDelta):
    """W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per output (PEFT) or per input (old LyCORIS) over
    everything else. DoRA's weight is ±1: a fraction of a rescaling means nothing."""

    label = "DoRA"

    @property
    def whole(self) -> bool:
        return self._m().dora_axis != 0

    def _view(self, ndim: int) -> list[int]:
        view = [1] * ndim
        view[self._m().dora_axis] = -1
        return view

    def _mag(self, c: Compute) -> torch.Tensor:
        m = self._m()
        if m.magnitude is None:
            raise InternalError(f"a DoRA edit on {m.target} without a magnitude")
        mag = m.magnitude
        if self.window and m.dora_axis == 0:
            mag = mag[self.window[0]:self.window[1]]
        return mag.to(device=c.device, dtype=c.dtype)

    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        m = self._m()
        i, j = self._span(W)
        V = W + m.block(i, j, dtype=c.dtype, device=c.device, weight=abs(self.weight))
        dims = tuple(d for d in range(V.dim()) if d != m.dora_axis)
        norm = torch.linalg.vector_norm(V, dim=dims, keepdim=True)
        if c.norms is not None:
            c.norms.append(norm.reshape(-1).float().cpu())
        return V * (self._mag(c).reshape(self._view(V.dim())) / norm)

    def inverse(self, *, norm: torch.Tensor | None, original: torch.Tensor) -> Edit:
        if norm is None:
            raise InternalError("undoing a DoRA edit without its norms")
        return DoraUndo(self.adapter, -abs(self.weight), self.window, module=self.module, norm=norm)

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        raise InternalError("DoRA bounds the whole result (bound_override)")

    def bound_override(self, ref: torch.Tensor) -> torch.Tensor:
        m = self._m()
        return torch.full(ref.shape, (m.fan_in + (m.delta.depth or 0) + 4) * U32 * float(ref.abs().max()))

    def describe(self, who: str) -> str:
        return f"DoRA r={self._m().rank} from {who} (weight {self.weight:g})"


@dataclass(frozen=True, eq=False)
class DoraUndo(Dora):
    """The inverse of :class:`Dora` given the norms ‖W+ΔW‖ its merge stored: W = W'·‖W+ΔW‖/m − ΔW."""

    norm: torch.Tensor | None = None
    label = "DoRA taken out"

    def _norm(self, c: Compute) -> torch.Tensor:
        if self.norm is None:
            raise InternalError("DoraUndo without norms")
        n = self.norm
        if self.window and self._m().dora_axis == 0:
            n = n[self.window[0]:self.window[1]]
        return n.to(device=c.device, dtype=c.dtype)

    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        m = self._m()
        i, j = self._span(W)
        view = self._view(W.dim())
        factor = self._norm(c).reshape(view) / self._mag(c).reshape(view)
        return W * factor - m.block(i, j, dtype=c.dtype, device=c.device, weight=1.0)

    def inverse(self, *, norm: torch.Tensor | None, original: torch.Tensor) -> Edit:
        return Dora(self.adapter, abs(self.weight), self.window, module=self.module)

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        m = self._m()
        i, j = self._span(mag)
        view = self._view(mag.dim())
        cf = Compute(torch.float32, torch.device("cpu"))
        mag = mag * (self._norm(cf) / self._mag(cf)).abs().reshape(view)
        return mag + m.block(i, j, magnitude=True), m.delta.depth + 2

    def bound_override(self, ref: torch.Tensor) -> None:
        return None

    def describe(self, who: str) -> str:
        return f"DoRA taken out from {who}"


@dataclass(frozen=True, eq=False)
class AddBias(AddDelta):
    """b += weight · factor · bias on the module's ``bias_target``: PEFT's lora_bias (factor = the
    module's scale) or LyCORIS ``diff_b`` (factor 1)."""

    label = "lora bias"

    def _bias(self, W: torch.Tensor) -> torch.Tensor:
        m = self._m()
        if m.bias is None:
            raise InternalError(f"AddBias on {m.target} without a bias")
        i, j = self._span(W)
        return m.bias[i:j]

    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        return W + self._bias(W).to(device=c.device, dtype=c.dtype) * (float(self.weight) * self._m().bias_factor)

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        return mag + self._bias(mag).float().abs() * abs(self.weight * self._m().bias_factor), 0

    def describe(self, who: str) -> str:
        return f"lora bias from {who} (weight {self.weight:g})"


@dataclass(frozen=True, eq=False)
class Apply(Edit):
    """W = f(W) for a change that is a function of the weight — (IA)³ scaling, OFT/BOFT rotations
    (``deltas.Transform``); ``inverted`` takes it out again. |weight| interpolates from the
    identity, as LyCORIS' multiplier does."""

    module: LoraModule | None = None
    inverted: bool = False
    label = "transform"

    def _m(self) -> LoraModule:
        if self.module is None or getattr(self.module.delta, "additive", True):
            raise InternalError("an Apply edit needs a module whose change is a function of the weight")
        return self.module

    @property
    def whole(self) -> bool:
        m = self._m()
        return bool(getattr(m.delta, "whole_rows", False)) and m.out_axis == 0

    def _f(self, W: torch.Tensor, absolute: bool) -> torch.Tensor:
        m = self._m()
        window = self.window or (0, W.shape[0])
        return m.delta.apply(W, out_axis=m.out_axis, weight=abs(self.weight), inverse=self.inverted,  # type: ignore[attr-defined]
                             window=window, absolute=absolute)

    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        return self._f(W, absolute=False)

    def _rows(self, i: int, j: int) -> Edit:
        return replace(self, window=_window(self, i, j))

    def inverse(self, *, norm: torch.Tensor | None, original: torch.Tensor) -> Edit:
        return replace(self, weight=-self.weight, inverted=not self.inverted)

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        return self._f(mag, absolute=True), self._m().delta.depth

    def describe(self, who: str) -> str:
        d = self._m().delta.describe()
        return f"{d['kind']}{' taken out' if self.inverted else ''} from {who} (weight {abs(self.weight):g})"


@dataclass(frozen=True, eq=False)
class Replace(Edit):
    """W = ``tensor`` (a module saved whole, or the original put back when one is taken out)."""

    tensor: torch.Tensor | None = None
    replaces = True

    def _t(self) -> torch.Tensor:
        if self.tensor is None:
            raise InternalError("Replace without a tensor")
        return self.tensor

    def apply(self, W: torch.Tensor, c: Compute) -> torch.Tensor:
        return self._t().to(device=c.device, dtype=c.dtype).clone()

    def _rows(self, i: int, j: int) -> Edit:
        return replace(self, tensor=self._t()[i:j], window=_window(self, i, j))

    def inverse(self, *, norm: torch.Tensor | None, original: torch.Tensor) -> Edit:
        return Replace(self.adapter, -1.0, tensor=original)

    def grow_bound(self, mag: torch.Tensor, c: Compute) -> tuple[torch.Tensor, int]:
        return self._t().float().abs(), 0  # what came before is overwritten

    def describe(self, who: str) -> str:
        return f"{'restored, undoing' if self.weight < 0 else 'replaced by'} {who}"


# --- edits over a whole tensor --------------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 22  # rows are processed in blocks of about this many elements


def apply_edits(W: torch.Tensor, edits: list[Edit], c: Compute) -> torch.Tensor:
    """Apply a tensor's edits in order to W (already in the compute dtype on the device)."""
    for e in edits:
        W = e.apply(W, c)
    return W


def inverse_edits(edits: list[Edit], *, norm: torch.Tensor | None, original: torch.Tensor) -> list[Edit]:
    """The edits unmerge applies to take ``edits`` out again, in the order it applies them:
    deltas negated in adapter order, DoRA undone with its norms, a replaced tensor restored last."""
    inv = [e.inverse(norm=norm, original=original) for e in edits]
    return [e for e in inv if not e.replaces] + [e for e in inv if e.replaces]


def row_blocks(shape: tuple[int, ...], edits: list[Edit], chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Row ranges to process a tensor in; one block when an edit needs whole columns."""
    if not shape or any(e.whole for e in edits):
        return [(0, shape[0] if shape else 1)]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, chunk // per_row)
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [(0, 0)]


def error_bound(edits: list[Edit], W: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound (float32) on |computed − ref| from the float32 arithmetic, before rounding:
    γ-bound (products summed + additions) · u₃₂ · the magnitude of everything summed."""
    for e in edits:
        override = e.bound_override(ref)
        if override is not None:
            return override
    c = Compute(torch.float32, torch.device("cpu"))
    mag = torch.zeros(ref.shape) if any(e.replaces for e in edits) else W.abs().float()
    depth = 0
    for e in edits:
        mag, d = e.grow_bound(mag, c)
        depth += d
    # 1.01: the bound itself is evaluated in float32
    return mag.mul_(1.01 * (depth + 2 + len(edits)) * U32)
