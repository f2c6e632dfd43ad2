"""PEFT's own (IA)³ and OFT adapters against PEFT: ``merge_and_unload`` and the un-merged forward
pass of the PeftModel are the oracles; the adapters are made by PEFT (``get_peft_model``) on a
tiny model with Linear, feed-forward Linear and 3×3 conv layers, their weights randomised with a
seeded generator (PEFT starts them at the identity) and saved by ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import loratools

peft = pytest.importorskip("peft")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.ff = nn.Linear(32, 16)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.ff(torch.tanh(self.proj(x))), self.conv(y), self.conv1(y)


INPUTS = (torch.randn(3, 16, generator=torch.Generator().manual_seed(1)),
          torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(2)))
CASES = {
    "ia3": lambda: peft.IA3Config(target_modules=["proj", "ff", "conv", "conv1"], feedforward_modules=["ff"]),
    "ia3-conv-feedforward": lambda: peft.IA3Config(target_modules=["proj", "conv"], feedforward_modules=["conv"]),
    "oft": lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=["proj", "ff", "conv", "conv1"]),
    "oft-exact-cayley": lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=["proj", "conv"],
                                              use_cayley_neumann=False),
    "oft-block-share": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["proj", "ff"], block_share=True),
    "oft-coft": lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=["proj", "ff"], coft=True, eps=1e-2),
    "boft": lambda: peft.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2,
                                    target_modules=["proj", "ff", "conv", "conv1"]),
    "boft-three-stages": lambda: peft.BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=3,
                                                target_modules=["proj", "ff"]),
}


def make(tmp: Path, name: str) -> tuple[Path, Path, tuple, dict]:
    """(base file, adapter folder, the PeftModel's outputs, merge_and_unload's weights)."""
    torch.manual_seed(0)
    model = Tiny()
    base = tmp / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    if "boft" in name:
        # without its CUDA extension PEFT forces a single butterfly stage (no permutations at all); make it
        # build the stages the config asks for, then merge and run with torch's block_diag as on CPU
        import peft.tuners.boft.layer as boft_layer

        real = boft_layer.get_fbd_cuda
        boft_layer.get_fbd_cuda = lambda: True
        try:
            pm = peft.get_peft_model(model, CASES[name]())
        finally:
            boft_layer.get_fbd_cuda = real
        for module in pm.modules():
            if hasattr(module, "fbd_cuda_available"):
                module.fbd_cuda_available = False
    else:
        pm = peft.get_peft_model(model, CASES[name]())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "oft_R" in n or "boft_R" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "boft_s" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    out = tmp / "adapter"
    pm.save_pretrained(out)
    pm.eval()
    if "boft" in name:  # PEFT's CPU path cannot run several stages (block_diag of 3-D tensors): assemble
        return base, out, None, _boft_merged(pm)  # its get_delta_weight from its own Cayley and permutations
    with torch.no_grad():
        want = tuple(o.clone() for o in pm(*INPUTS))
        merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base, out, want, merged


def _boft_merged(pm) -> dict:
    """PEFT's BOFT merge (``BOFTLayer.get_delta_weight`` and ``merge``) on CPU for any number of
    stages: PEFT's ``cayley_batch`` and ``boft_P`` permutation matrices, one block_diag per stage,
    the stages multiplied in PEFT's order, W' = (M Wᵀ)ᵀ ⊙ boft_s."""
    merged = {}
    with torch.no_grad():
        for name, layer in pm.named_modules():
            if not hasattr(layer, "boft_R") or "default" not in getattr(layer, "boft_R", {}):
                continue
            R, s = layer.boft_R["default"], layer.boft_s["default"]
            N, D, H, _ = R.shape
            C = layer.cayley_batch(R.view(N * D, H, H)).view(N, D, H, H)
            B = torch.stack([torch.block_diag(*torch.unbind(C[i])) for i in range(N)])
            P = layer.boft_P
            batch = torch.bmm(P, torch.bmm(B, P.permute(0, 2, 1)))
            M = batch[0]
            for i in range(1, N):
                M = batch[i] @ M
            W = layer.get_base_layer().weight
            flat = W.reshape(W.shape[0], -1)
            s = s if s.shape[0] == W.shape[0] else s.transpose(0, 1)
            key = name.removeprefix("base_model.model.") + ".weight"
            merged[key] = ((M @ flat.T).T * s).reshape(W.shape).clone()
    return merged


def outputs(path: Path) -> tuple[torch.Tensor, ...]:
    model = Tiny()
    model.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return model(*INPUTS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_equals_peft(tmp_path: Path, name: str) -> None:
    base, adapter, want, theirs = make(tmp_path, name)
    out = tmp_path / "m.safetensors"
    assert loratools.merge(base, adapter, out).verify.ok
    ours = load_file(str(out))
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k
    # PEFT's un-merged OFT on a conv rotates unfolded patches and folds them back summed (padding 0),
    # which is not the layer its own merge_and_unload makes: there the merge is the oracle
    checked = outputs(out) if "oft" not in name else outputs(out)[:1]
    for g, w in zip(checked, want or ()):
        assert float((g - w).abs().max()) <= 5e-6 * max(1.0, float(w.abs().max()))
    assert loratools.verify_checkpoint(base, [adapter], out, forward=True).ok


@pytest.mark.parametrize("name", ["ia3", "oft", "boft-three-stages"])
def test_unmerge_gives_the_base_back(tmp_path: Path, name: str) -> None:
    base, adapter, _, _ = make(tmp_path, name)
    merged, back = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    loratools.merge(base, adapter, merged)
    loratools.unmerge(merged, adapter, back)
    original, restored = load_file(str(base)), load_file(str(back))
    for k in original:
        assert torch.allclose(original[k], restored[k], rtol=0, atol=5e-6), k


def test_other_formats_refuse_what_they_cannot_express(tmp_path: Path) -> None:
    """PEFT OFT rotates inputs (LyCORIS' OFT rotates outputs) and PEFT (IA)³ on outputs scales the bias
    (LyCORIS' does not): converting them to a kohya/LyCORIS file is refused, nothing written."""
    from click.testing import CliRunner

    from loratools.cli import cli

    for name in ("oft", "ia3"):
        d = tmp_path / name
        d.mkdir()
        base, adapter, _, _ = make(d, name)
        res = CliRunner().invoke(cli, ["convert", str(adapter), str(d / "k"), "--to", "kohya", "--base", str(base)])
        assert res.exit_code == 1 and "Traceback" not in res.output and not (d / "k").exists(), res.output


@pytest.mark.parametrize("name", ["ia3", "ia3-conv-feedforward"])
def test_ia3_round_trip_loads_in_peft(tmp_path: Path, name: str) -> None:
    base, adapter, want, _ = make(tmp_path, name)
    out = tmp_path / "again"
    loratools.convert(adapter, out, to="peft", base=base)
    model = Tiny()
    model.load_state_dict(load_file(str(base)))
    pm = peft.PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        for g, w in zip(pm(*INPUTS), want):
            assert float((g - w).abs().max()) <= 2e-6 * max(1.0, float(w.abs().max()))
