from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an output (a .safetensors file or a folder of shards), through safetensors itself."""
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.safetensors")
                                                 if not p.name.endswith("loratools_undo.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def file_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def assert_close_fp32(ours: torch.Tensor, ref: torch.Tensor, name: str, rtol: float = 1e-5) -> None:
    """fp32 agreement: |ours − ref| ≤ rtol·max|ref| elementwise (1e-5 relative, per the issue)."""
    assert ours.shape == ref.shape, f"{name}: {tuple(ours.shape)} vs {tuple(ref.shape)}"
    scale = float(ref.abs().max()) or 1.0
    err = float((ours.double() - ref.double()).abs().max())
    assert err <= rtol * scale, f"{name}: max error {err:.3e} > {rtol:g}·{scale:.3e}"


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bfloat16 at |x| (x float64), from the format's definition: 8 significant bits."""
    a = x.abs().clamp_min(2.0**-126)
    return torch.pow(2.0, torch.floor(torch.log2(a)) - 7)


def peft_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())
