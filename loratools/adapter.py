"""The canonical adapter: every format is read into this and written from this.

A :class:`LoraModule` holds its factors in one orientation, whatever the source format:

* ``A``: (r, fan_in) — for a conv target fan_in = in_channels·kh·kw, for an embedding fan_in = vocab;
* ``B``: (fan_out, r);
* ``ΔW = scale · B @ A``, shape (fan_out, fan_in), then transposed when the base stores (in, out)
  (GPT-2 ``Conv1D``, embeddings), then reshaped to the base tensor's shape (conv kernels).

:func:`delta` is the only place that formula lives; merge, unmerge, verify and every writer use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .errors import NonFiniteError

__all__ = ["LoraModule", "Adapter", "delta", "delta_bias", "check_finite"]

@dataclass
class LoraModule:
    """One LoRA module bound (or to be bound) to one base tensor.

    ``transposed`` is True when the base stores the weight as (fan_in, fan_out): GPT-2 ``Conv1D``
    and embeddings (V, d). ``None`` means not settled yet: binding to a base decides it.
    ``shape`` is the base tensor's shape once bound (``None`` before).
    """

    target: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None
    kind: str = "linear"
    transposed: bool | None = False
    shape: tuple[int, ...] | None = None
    kernel: tuple[int, ...] = ()
    magnitude: torch.Tensor | None = None  # DoRA, (fan_out,)
    bias: torch.Tensor | None = None  # PEFT lora_B.bias, (fan_out,), unscaled
    bias_target: str | None = None
    source_keys: tuple[str, ...] = ()
    dora_per_input: bool = False  # old LyCORIS dora_scale (1, in): the norm is taken per input column

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def fan_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def fan_out(self) -> int:
        return int(self.B.shape[0])

    def storage_shape(self, transposed: bool) -> tuple[int, ...]:
        """The base shape this module fits when stored (out, in…) or, transposed, (in, out)."""
        if self.kind == "conv":
            return (self.fan_out, self.fan_in // max(1, math.prod(self.kernel)), *self.kernel)
        return (self.fan_in, self.fan_out) if transposed else (self.fan_out, self.fan_in)

    @property
    def out_axis(self) -> int:
        """The axis of the stored tensor that indexes outputs."""
        return 1 if self.transposed else 0

    @property
    def dora_axis(self) -> int:
        """The axis DoRA's magnitude runs along: outputs (PEFT, new LyCORIS), or inputs (old LyCORIS)."""
        return 1 - self.out_axis if self.dora_per_input else self.out_axis

    def with_(self, **changes: Any) -> "LoraModule":
        return replace(self, **changes)


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
        n = sum(m.A.numel() + m.B.numel() for m in self.modules.values())
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
    """ΔW = weight · scale · B @ A in the base tensor's shape and storage order.

    The product is formed in ``dtype`` (float32 by default) on ``device``; the factor
    ``weight·scale`` is applied to the smaller of the two factors before the product, so the
    result carries a single rounding of the matmul.
    """
    A = module.A.to(device=device, dtype=dtype)
    B = module.B.to(device=device, dtype=dtype)
    factor = float(weight) * float(module.scale)
    if A.numel() <= B.numel():
        A = A * factor
    else:
        B = B * factor
    dw = B @ A
    if module.transposed:
        dw = dw.T
    shape = module.shape or module.storage_shape(bool(module.transposed))
    return dw.reshape(shape).contiguous()


def delta_bias(
    module: LoraModule,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    weight: float = 1.0,
) -> torch.Tensor | None:
    """The change PEFT's ``lora_bias`` makes to the base bias: weight · scale · lora_B.bias."""
    if module.bias is None:
        return None
    return module.bias.to(device=device, dtype=dtype) * (float(weight) * float(module.scale))


def check_finite(tensor: torch.Tensor, *, what: str, path: Path | str | None = None) -> None:
    """Raise NonFiniteError when a floating tensor holds NaN or Inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        raise NonFiniteError(
            f"{what} holds {nan} NaN and {inf} Inf values.",
            path=path,
            tensor=what,
            hint="loratools refuses non-finite values: they would spread through every output they touch. "
            "Check how the adapter was trained or saved.",
        )
