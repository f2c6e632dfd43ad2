"""Merging into fp8 checkpoints (float8_e4m3fn / float8_e5m2 weights, as many Flux and Wan single
files ship): computed in float32 and rounded once to the fp8 dtype; values beyond the fp8 range are
refused (torch's cast would clip e4m3fn to ±448 silently); ``--dtype bf16`` writes bf16 instead.
Float64 arithmetic is the oracle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import loratools
from loratools.cli import cli

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _files(tmp: Path, dtype: torch.dtype) -> tuple[Path, Path, dict]:
    g = torch.Generator().manual_seed(0)
    base = {"blocks.0.proj.weight": (torch.randn(32, 16, generator=g) * 0.5).to(dtype),
            "blocks.0.proj.bias": torch.randn(32, generator=g), "blocks.0.norm.weight": torch.ones(16)}
    b = tmp / "base.safetensors"
    save_file(base, str(b))
    lora = {"diffusion_model.blocks.0.proj.lora_B.weight": torch.randn(32, 4, generator=g) * 0.3,
            "diffusion_model.blocks.0.proj.lora_A.weight": torch.randn(4, 16, generator=g) * 0.3,
            "diffusion_model.blocks.0.proj.alpha": torch.tensor(2.0)}
    a = tmp / "lora.safetensors"
    save_file(lora, str(a))
    exact = base["blocks.0.proj.weight"].double() + 0.5 * (
        lora["diffusion_model.blocks.0.proj.lora_B.weight"].double() @ lora["diffusion_model.blocks.0.proj.lora_A.weight"].double())
    return b, a, {"exact": exact, "base": base}


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_base_is_rounded_once(tmp_path: Path, dtype: torch.dtype) -> None:
    b, a, ref = _files(tmp_path, dtype)
    out = tmp_path / "m.safetensors"
    assert loratools.merge(b, a, out).verify.ok
    got = load_file(str(out))
    w = got["blocks.0.proj.weight"]
    assert w.dtype == dtype
    exact = ref["exact"]
    nearest = exact.float().to(dtype).double()  # float64 → float32 (exact here) → fp8, round to nearest even
    assert float((w.double() == nearest).double().mean()) > 0.99
    mantissa = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    tiny = float(torch.finfo(dtype).tiny)  # below it the spacing is the subnormal one
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(tiny))) - mantissa)
    assert bool(((w.double() - exact).abs() <= ulp).all())  # never more than one fp8 ulp away
    assert torch.equal(got["blocks.0.proj.bias"], ref["base"]["blocks.0.proj.bias"])  # untouched: the same bytes


def test_fp8_base_to_bf16(tmp_path: Path) -> None:
    b, a, ref = _files(tmp_path, torch.float8_e4m3fn)
    out = tmp_path / "m.safetensors"
    loratools.merge(b, a, out, dtype="bf16")
    w = load_file(str(out))["blocks.0.proj.weight"]
    assert w.dtype == torch.bfloat16
    assert float((w.double() - ref["exact"]).abs().max()) <= 2.0**-8 * float(ref["exact"].abs().max())


def test_values_beyond_the_fp8_range_are_refused(tmp_path: Path) -> None:
    b, a, _ = _files(tmp_path, torch.float8_e4m3fn)
    res = CliRunner().invoke(cli, ["merge", str(b), str(a), str(tmp_path / "m.safetensors"), "--weight", "20000"])
    assert res.exit_code == 1 and "448" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("scale", ["weight_scale_inv", "weight_scale", "scale_weight"])
def test_scaled_e5m2_is_never_merged_into_its_codes(tmp_path: Path, scale: str) -> None:
    """e5m2 codes with a scale tensor: merging ΔW into the codes would ignore the scale, and e5m2 is
    not requantized (tests/test_fp8_blocks.py covers e4m3) — refused, nothing written; --dtype bf16
    dequantizes: code × scale + ΔW, rounded once."""
    b, a, ref = _files(tmp_path, torch.float8_e5m2)
    tensors = dict(ref["base"])
    tensors[f"blocks.0.proj.{scale}"] = torch.tensor([[0.01]])
    save_file(tensors, str(b))
    res = CliRunner().invoke(cli, ["merge", str(b), str(a), str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and scale in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.safetensors").exists()
    res = CliRunner().invoke(cli, ["merge", str(b), str(a), str(tmp_path / "m.safetensors"), "--dtype", "bf16"])
    assert res.exit_code == 0, res.output
    w = load_file(str(tmp_path / "m.safetensors"))["blocks.0.proj.weight"].double()
    exact = ref["exact"] - ref["base"]["blocks.0.proj.weight"].double() + ref["base"]["blocks.0.proj.weight"].double() * 0.01
    assert float((w - exact).abs().max()) <= 2.0**-8 * float(exact.abs().max())
