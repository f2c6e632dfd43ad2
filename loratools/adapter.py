"""The canonical adapter: every format is read into this and written from this.

A :class:`LoraModule` binds one :class:`~loratools.deltas.Delta` (the math: ΔW as an
(out_features, in_features) matrix) to one base tensor, and says how that tensor stores it:

* ``kind``: ``linear``, ``conv`` (``kernel`` gives kh, kw…; in_features = in_channels·kh·kw) or
  ``embedding``;
* ``transposed``: the base stores (in, out) — GPT-2 ``Conv1D``, embeddings (V, d) — so ΔW is
  transposed before it is added; ``None`` until binding to a base settles it;
* ``shape``: the base tensor's shape once bound;
* optional DoRA ``magnitude`` and a bias change: PEFT ``lora_B.bias`` or LyCORIS ``diff_b`` (``bias``,
  times ``bias_factor``, added to ``bias_target``).

:meth:`LoraModule.block` is the only place a delta meets a stored tensor's layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .deltas import Delta, LowRank
from .errors import NonFiniteError

__all__ = ["LoraModule", "Adapter", "delta", "check_finite", "lowrank_module"]


@dataclass
class LoraModule:
    """One adapter module bound (or to be bound) to one base tensor."""

    target: str
    delta: Delta
    kind: str = "linear"
    transposed: bool | None = False
    shape: tuple[int, ...] | None = None
    kernel: tuple[int, ...] = ()
    magnitude: torch.Tensor | None = None  # DoRA, one value per output (or per input: dora_per_input)
    bias: torch.Tensor | None = None  # PEFT lora_B.bias, (fan_out,), unscaled
    bias_target: str | None = None
    source_keys: tuple[str, ...] = ()
    dora_per_input: bool = False  # old LyCORIS dora_scale (1, in): the norm is taken per input column
    bias_scale: float | None = None  # what ``bias`` is multiplied by: None = the delta's scale (PEFT);
    # 1 for a LyCORIS ``diff_b`` (the bias change itself)

    @property
    def bias_factor(self) -> float:
        return self.scale if self.bias_scale is None else float(self.bias_scale)

    @property
    def rank(self) -> int | None:
        return self.delta.rank

    @property
    def fan_in(self) -> int:
        return self.delta.in_features

    @property
    def fan_out(self) -> int:
        return self.delta.out_features

    @property
    def scale(self) -> float:
        """The scale of a delta that has one (low-rank, full); 1 otherwise."""
        return float(getattr(self.delta, "scale", 1.0))

    def storage_shape(self, transposed: bool) -> tuple[int, ...]:
        """The base shape this module fits when stored (out, in…) or, transposed, (in, out)."""
        if self.kind == "conv":
            return (self.fan_out, self.fan_in // max(1, math.prod(self.kernel)), *self.kernel)
        if self.kind == "experts":  # fused experts (E, d1, d2): one delta per expert (deltas.Experts)
            return (self.fan_out, *self.delta.stored)  # type: ignore[attr-defined]
        return (self.fan_in, self.fan_out) if transposed else (self.fan_out, self.fan_in)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.shape or self.storage_shape(bool(self.transposed))

    @property
    def out_axis(self) -> int:
        """The axis of the stored tensor that indexes outputs."""
        return 1 if self.transposed else 0

    @property
    def dora_axis(self) -> int:
        """The axis DoRA's magnitude runs along: outputs (PEFT, new LyCORIS), or inputs (old LyCORIS)."""
        return 1 - self.out_axis if self.dora_per_input else self.out_axis

    def block(self, i: int, j: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              weight: float = 1.0, magnitude: bool = False) -> torch.Tensor:
        """weight · ΔW for rows i:j of the stored tensor, in its storage layout. With ``magnitude``
        the elementwise bound on the terms instead (for error bounds)."""
        d = self.delta.magnitude() if magnitude else self.delta
        w = abs(weight) if magnitude else weight
        if self.transposed:  # stored (in, out): its rows are ΔW's columns
            dw = d.cols(i, j, dtype=dtype, device=device, weight=w).T
        else:
            dw = d.rows(i, j, dtype=dtype, device=device, weight=w)
        return dw.reshape(j - i, *self.stored_shape[1:])

    def stored_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(L, R, scale) with scale · L @ R = ΔW in the stored tensor's layout, viewed as a matrix
        (rows × the rest); None for deltas without a low-rank form. What the merge kernel adds."""
        d = self.delta
        if not isinstance(d, LowRank):
            return None
        if self.transposed:  # stored (in, out): ΔWᵀ = Aᵀ Bᵀ
            return d.A.T, d.B.T, float(d.scale)
        return d.B, d.A, float(d.scale)

    def take(self, idx: torch.Tensor, *, dtype: torch.dtype = torch.float64, weight: float = 1.0,
             magnitude: bool = False) -> torch.Tensor:
        """weight · ΔW at stored rows ``idx`` (any rows, in the given order), formed from the delta's
        own factors in ``dtype`` — what verification re-computes, apart from the merge's kernels."""
        d = self.delta.magnitude() if magnitude else self.delta
        w = abs(weight) if magnitude else weight
        rows = (d.T if self.transposed else d).take_rows(idx, dtype=dtype, weight=w)
        return rows.reshape(len(idx), *self.stored_shape[1:])

    def with_(self, **changes: Any) -> "LoraModule":
        return replace(self, **changes)


def lowrank_module(target: str, A: torch.Tensor, B: torch.Tensor, scale: float, alpha: float | None = None,
                   **fields: Any) -> LoraModule:
    """A module whose delta is scale · B @ A (A (r, in), B (out, r)): what most formats hold."""
    return LoraModule(target=target, delta=LowRank(A, B, float(scale), alpha), **fields)


@dataclass
class Adapter:
    """A whole adapter in canonical form.

    ``modules``: LoRA modules by target tensor name. ``replacements``: full tensors that replace a
    base tensor (PEFT ``modules_to_save``, trained biases). ``meta``: the source format, its config,
    base model id. ``warnings``: things the reader noticed that the user should hear about.
    """

    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def format(self) -> str:
        return str(self.meta.get("format", "unknown"))

    def parameter_count(self) -> int:
        """Parameters the adapter holds: a tensor that several modules share (an expert's lora_A,
        shared by its gate and up halves) counted once."""
        seen: set[tuple] = set()
        n = 0
        for m in self.modules.values():
            for t in m.delta.tensors().values():
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
                if key not in seen:
                    seen.add(key)
                    n += t.numel()
        n += sum(m.magnitude.numel() for m in self.modules.values() if m.magnitude is not None)
        n += sum(m.bias.numel() for m in self.modules.values() if m.bias is not None)
        return n + sum(t.numel() for t in self.replacements.values())


def delta(
    module: LoraModule,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """weight · ΔW of ``module`` in its base tensor's shape and storage order, formed in ``dtype``
    (float32 by default) on ``device``."""
    return module.block(0, module.stored_shape[0], dtype=dtype, device=device, weight=weight).contiguous()


def check_finite(tensor: torch.Tensor, *, what: str, path: Path | str | None = None) -> None:
    """Raise NonFiniteError when a floating tensor holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.element_size() == 1:
        if tensor.is_floating_point():  # fp8: no isfinite kernel; the widened values tell the same
            check_finite(tensor.float(), what=what, path=path)
        return
    if not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise NonFiniteError(
            f"{what} holds {nan} NaN and {inf} Inf values.",
            path=path,
            tensor=what,
            hint="loratools refuses non-finite values: they would spread through every output they touch. "
            "Check how the adapter was trained or saved.",
        )
