"""Small modules written the way people write their own LoRA code, each in a different style.

Their own ``forward`` (with the LoRA active, at the scale their code uses) is the oracle for merge;
``plain()`` is the same network with ordinary ``nn.Linear`` layers holding the base weights, onto
which PEFT loads a converted adapter.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class OutRIn(nn.Module):
    """``lora_a`` (out, r), ``lora_b`` (r, in); ΔW = lora_a @ lora_b (names swapped against PEFT's roles)."""

    def __init__(self, i: int, o: int, r: int, bias: bool, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o)) if bias else None
        self.lora_a = nn.Parameter(torch.randn(o, r) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(r, i) * 0.3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * x @ (self.lora_a @ self.lora_b).T


class BOutAIn(nn.Module):
    """``lora_b`` (out, r), ``lora_a`` (r, in); ΔW = lora_b @ lora_a."""

    def __init__(self, i: int, o: int, r: int, bias: bool, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o)) if bias else None
        self.lora_b = nn.Parameter(torch.randn(o, r) * 0.3)
        self.lora_a = nn.Parameter(torch.randn(r, i) * 0.3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


class InROut(nn.Module):
    """``lora_A`` (in, r), ``lora_B`` (r, out); y += scale · x @ lora_A @ lora_B."""

    def __init__(self, i: int, o: int, r: int, bias: bool, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o)) if bias else None
        self.lora_A = nn.Parameter(torch.randn(i, r) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(r, o) * 0.3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * (x @ self.lora_A @ self.lora_B)


class UV(nn.Module):
    """``U`` (in, r), ``V`` (r, out) — the (in,r)@(r,out) layout under other names."""

    def __init__(self, i: int, o: int, r: int, bias: bool, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o)) if bias else None
        self.U = nn.Parameter(torch.randn(i, r) * 0.3)
        self.V = nn.Parameter(torch.randn(r, o) * 0.3)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * (x @ self.U @ self.V)


class SiblingLinears(nn.Module):
    """``nn.Linear`` lora_A (r, in) / lora_B (out, r) as siblings of ``q_proj`` in the same parent."""

    def __init__(self, i: int, o: int, r: int, bias: bool, scale: float) -> None:
        super().__init__()
        self.q_proj = nn.Linear(i, o, bias=bias)
        self.k_proj = nn.Linear(i, o + 3, bias=bias)  # a sibling the factors do not fit
        self.lora_A = nn.Linear(i, r, bias=False)
        self.lora_B = nn.Linear(r, o, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x) + self.scale * self.lora_B(self.lora_A(x))
        return torch.cat([q, self.k_proj(x)], dim=-1)


class UpDownSubmodules(nn.Module):
    """A LoRA wrapper with submodules ``base``, ``lora_down``, ``lora_up``: keys base.weight, lora_down.weight…"""

    def __init__(self, i: int, o: int, r: int, bias: bool, scale: float) -> None:
        super().__init__()
        self.base = nn.Linear(i, o, bias=bias)
        self.lora_down = nn.Linear(i, r, bias=False)
        self.lora_up = nn.Linear(r, o, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_up(self.lora_down(x))


STYLES = {"out-r-in": OutRIn, "b-out-a-in": BOutAIn, "in-r-out": InROut, "uv": UV, "siblings": SiblingLinears,
          "updown": UpDownSubmodules}


class Net(nn.Module):
    """Two layers of one style: a non-square (12→20, bias) and a square (20→20, no bias) one,
    or only the square one when ``square_only``."""

    def __init__(self, style: str, *, scale: float, square_only: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        cls = STYLES[style]
        self.square_only = square_only
        if not square_only:
            self.first = cls(12, 20, 4, True, scale)
        self.second = cls(20, 20, 3, False, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.square_only else self.first(x)[..., :20]
        return self.second(h)[..., :20]

    def in_features(self) -> int:
        return 20 if self.square_only else 12


class PlainNet(nn.Module):
    """The same network without LoRA: nn.Linear layers under the names the base weights have."""

    def __init__(self, style: str, square_only: bool = False) -> None:
        super().__init__()
        self.square_only = square_only

        def block(i: int, o: int, bias: bool) -> nn.Module:
            if style == "siblings":
                m = nn.Module()
                m.q_proj = nn.Linear(i, o, bias=bias)
                m.k_proj = nn.Linear(i, o + 3, bias=bias)
                return m
            if style == "updown":
                m = nn.Module()
                m.base = nn.Linear(i, o, bias=bias)
                return m
            return nn.Linear(i, o, bias=bias)

        self.style = style
        if not square_only:
            self.first = block(12, 20, True)
        self.second = block(20, 20, False)

    def _run(self, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.style == "siblings":
            return torch.cat([m.q_proj(x), m.k_proj(x)], dim=-1)
        if self.style == "updown":
            return m.base(x)
        return m(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.square_only else self._run(self.first, x)[..., :20]
        return self._run(self.second, h)[..., :20]
