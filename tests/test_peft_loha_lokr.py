"""PEFT's own LoHa and LoKr adapters against PEFT: made by ``get_peft_model`` on a tiny model
(Linear, 1×1 conv, 3×3 conv), weights randomised with a seeded generator (PEFT starts one factor
at zero), saved by ``save_pretrained``; ``merge_and_unload`` and the PeftModel's forward pass are
the oracles. LyCORIS files converted to PEFT are loaded by PEFT itself and compared with the LyCORIS
network's forward pass."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loratools

peft = pytest.importorskip("peft")
lycoris = pytest.importorskip("lycoris")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.conv1 = nn.Conv2d(8, 16, 1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x), self.conv1(y), self.conv3(y)


INPUTS = (torch.randn(3, 16, generator=torch.Generator().manual_seed(1)),
          torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(2)))
TARGETS = ["proj", "conv1", "conv3"]
CASES = {
    "loha": lambda: peft.LoHaConfig(r=4, alpha=2, target_modules=TARGETS),
    "loha-effective-conv2d-patterns": lambda: peft.LoHaConfig(
        r=4, alpha=2, target_modules=TARGETS, use_effective_conv2d=True, rank_pattern={"conv3": 2},
        alpha_pattern={"proj": 6}),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS),
    "lokr-decompose-both": lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=TARGETS, decompose_both=True,
                                                  decompose_factor=4),
    "lokr-effective-conv2d": lambda: peft.LoKrConfig(r=2, alpha=1, target_modules=TARGETS, use_effective_conv2d=True,
                                                    decompose_factor=2),
    "lokr-both-whole": lambda: peft.LoKrConfig(r=16, alpha=4, target_modules=["proj"]),
}


def make(tmp: Path, name: str) -> tuple[Path, Path, tuple, dict]:
    torch.manual_seed(0)
    model = Tiny()
    base = tmp / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    pm = peft.get_peft_model(model, CASES[name]())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(s in n for s in ("hada_", "lokr_")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    out = tmp / "adapter"
    pm.save_pretrained(out)
    pm.eval()
    with torch.no_grad():
        want = tuple(o.clone() for o in pm(*INPUTS))
        merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, out, want, merged


def outputs(path: Path) -> tuple[torch.Tensor, ...]:
    model = Tiny()
    model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return model(*INPUTS)


def close(got: tuple, want: tuple, tol: float = 3e-6) -> None:
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) <= tol * max(1.0, float(w.abs().max()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_equals_peft(tmp_path: Path, name: str) -> None:
    base, adapter, want, theirs = make(tmp_path, name)
    out = tmp_path / "m.safetensors"
    assert loratools.merge(base, adapter, out).verify.ok
    ours = load_file(str(out))
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k
    close(outputs(out), want)
    back = tmp_path / "b.safetensors"
    loratools.unmerge(out, adapter, back)
    original = load_file(str(base))
    restored = load_file(str(back))
    assert all(torch.allclose(original[k], restored[k], rtol=0, atol=5e-6) for k in original)


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_round_trip_loads_in_peft(tmp_path: Path, name: str) -> None:
    """PEFT → loratools → PEFT: PEFT loads what loratools writes, and its forward is the original's."""
    base, adapter, want, _ = make(tmp_path, name)
    out = tmp_path / "again"
    loratools.convert(adapter, out, to="peft", base=base)
    model = Tiny()
    model.load_state_dict(load_file(str(base)))
    pm = peft.PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        close(pm(*INPUTS), want)


@pytest.mark.parametrize("algo,kw", [("loha", {}), ("loha", {"use_tucker": True}), ("lokr", {"factor": 4}),
                                     ("lokr", {"factor": 2, "use_tucker": True})])
def test_lycoris_file_to_peft_loads_in_peft(tmp_path: Path, algo: str, kw: dict) -> None:
    torch.manual_seed(0)
    model = Tiny()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, preset="full", **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    f = tmp_path / "ly.safetensors"
    net.save_weights(str(f), torch.float32, None)
    with torch.no_grad():
        want = tuple(o.clone() for o in model(*INPUTS))
    out = tmp_path / "peft"
    loratools.convert(f, out, to="peft", base=base)
    fresh = Tiny()
    fresh.load_state_dict(load_file(str(base)))
    pm = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    with torch.no_grad():
        close(pm(*INPUTS), want)


def test_mixed_kinds_are_refused_by_name(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from loratools.cli import cli

    torch.manual_seed(0)
    model = Tiny()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    g = torch.Generator().manual_seed(1)
    save_file({"lycoris_proj.lora_down.weight": torch.randn(2, 16, generator=g),
               "lycoris_proj.lora_up.weight": torch.randn(32, 2, generator=g),
               "lycoris_conv1.lokr_w1": torch.randn(4, 2, generator=g),
               "lycoris_conv1.lokr_w2": torch.randn(4, 4, 1, 1, generator=g)}, str(tmp_path / "mixed.safetensors"))
    res = CliRunner().invoke(cli, ["convert", str(tmp_path / "mixed.safetensors"), str(tmp_path / "p"), "--to", "peft",
                                   "--base", str(base)])
    assert res.exit_code == 1 and "lokr" in res.output and "conv1" in res.output and not (tmp_path / "p").exists()
