"""LyCORIS kinds (LoHa, LoKr, full diffs, DoRA on them) against LyCORIS itself.

The adapters are made by the ``lycoris-lora`` package on a tiny model (a Linear, a 1×1 and a 3×3
conv), their factors randomised with a seeded generator (LyCORIS starts one factor at zero) and
saved by LyCORIS' own ``save_weights``; the oracle is the LyCORIS network's forward pass. Float64
arithmetic is the oracle for rounding (bf16 bases) and for the low-rank approximations.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import loratools
from loratools.cli import cli

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora is a test dependency (pip install -e '.[test]')")
logging.getLogger("LyCORIS").setLevel(logging.ERROR)


class Tiny(nn.Module):
    """Outputs of 32 and 16 channels: BOFT's butterflies need powers of two."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 32)
        self.conv1 = nn.Conv2d(8, 16, 1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.proj(x), self.conv1(y), self.conv3(y)


CASES = {
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "loha-dora": dict(algo="loha", dora_wd=True),
    "loha-dora-per-input": dict(algo="loha", dora_wd=True, wd_on_output=False),
    "lokr": dict(algo="lokr", factor=4),
    "lokr-tucker": dict(algo="lokr", factor=2, use_tucker=True),
    "lokr-both-factorized": dict(algo="lokr", factor=4, decompose_both=True, linear_dim=1),
    "lokr-full-matrix": dict(algo="lokr", full_matrix=True),
    "lokr-dora": dict(algo="lokr", factor=2, dora_wd=True),
    "full": dict(algo="full"),
    "ia3": dict(algo="ia3"),
    "oft": dict(algo="diag-oft"),
    "oft-rescaled-constrained": dict(algo="diag-oft", rescaled=True, constraint=1e-4),
    "boft": dict(algo="boft"),
    "boft-rescaled-constrained": dict(algo="boft", rescaled=True, constraint=1e-3),
}
KIND = {"loha": "loha", "lokr": "lokr", "full": "full", "ia3": "ia3", "oft": "oft", "boft": "oft"}
INPUTS = (torch.randn(3, 16, generator=torch.Generator().manual_seed(5)),
          torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(6)))


def make(tmp: Path, case: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, tuple]:
    """(base file, LyCORIS file, the LyCORIS network's outputs on INPUTS)."""
    torch.manual_seed(seed)
    model = Tiny()
    base = tmp / "base.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(base))
    model.load_state_dict({k: v.float() for k, v in load_file(str(base)).items()})
    kw = dict(case)
    dim = kw.pop("linear_dim", 4)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=2, preset="full", **kw)
    net.apply_to()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "dora_scale" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    f = tmp / "lycoris.safetensors"
    net.save_weights(str(f), torch.float32, None)
    with torch.no_grad():
        want = tuple(o.clone() for o in model(*INPUTS))
    return base, f, want


def outputs(weights: Path) -> tuple[torch.Tensor, ...]:
    model = Tiny()
    model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    with torch.no_grad():
        return model(*INPUTS)


def close(got: tuple, want: tuple, tol: float = 2e-6) -> None:
    for g, w in zip(got, want):
        scale = max(1.0, float(w.abs().max()))
        assert float((g - w).abs().max()) <= tol * scale, float((g - w).abs().max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_equals_the_lycoris_forward_pass(tmp_path: Path, name: str) -> None:
    base, f, want = make(tmp_path, CASES[name])
    out = tmp_path / "merged.safetensors"
    result = loratools.merge(base, [f], out)
    assert result.verify is not None and result.verify.ok
    close(outputs(out), want)
    assert loratools.verify_checkpoint(base, [f], out, forward=True).ok
    kinds = {m.delta.kind for m in loratools.load_adapter(f).modules.values()}
    assert kinds == {KIND[name.split("-")[0]]}


def test_unmerge_takes_it_out_and_reversible_gives_the_bits_back(tmp_path: Path) -> None:
    base, f, _ = make(tmp_path, CASES["lokr-tucker"])
    merged, back = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    loratools.merge(base, f, merged, reversible=True)  # one adapter need not be a list
    loratools.unmerge(merged, f, back)
    original, restored = load_file(str(base)), load_file(str(back))
    assert all(torch.equal(original[k], restored[k]) for k in original)
    loratools.merge(base, [f], merged, overwrite=True)
    loratools.unmerge(merged, [f], back, overwrite=True)
    restored = load_file(str(back))
    for k in original:
        assert torch.allclose(original[k], restored[k], rtol=0, atol=2e-6), k


def test_dora_unmerge_restores_the_base(tmp_path: Path) -> None:
    base, f, _ = make(tmp_path, CASES["loha-dora"])
    merged, back = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    loratools.merge(base, [f], merged)
    loratools.unmerge(merged, [f], back)
    original, restored = load_file(str(base)), load_file(str(back))
    for k in original:
        assert torch.allclose(original[k], restored[k], rtol=0, atol=1e-5), k


def test_bf16_base_is_rounded_once_from_float64(tmp_path: Path) -> None:
    """Every merged element is float64's W + ΔW rounded to bf16, or its neighbour (≤ 1 ulp)."""
    base, f, _ = make(tmp_path, CASES["loha-tucker"], dtype=torch.bfloat16)
    out = tmp_path / "m.safetensors"
    loratools.merge(base, [f], out)
    ad = loratools.load_adapter(f, base=base)
    merged, original = load_file(str(out)), load_file(str(base))
    for target, m in ad.modules.items():
        exact = original[target].double() + _dw64(f, target, m.stored_shape)
        got = merged[target].double()
        ulp = (exact.to(torch.bfloat16).double() - exact).abs().max() * 2 + 1e-30
        assert float((got - exact).abs().max()) <= float(ulp), target
        assert float((got == exact.to(torch.bfloat16).double()).double().mean()) > 0.99


def _dw64(f: Path, target: str, shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW of one LoHa module from the file's tensors in float64, by the formula (ComfyUI's einsums)."""
    stem = "lycoris_" + target.removesuffix(".weight").replace(".", "_")
    with safe_open(str(f), "pt") as h:
        t = {k.split(".", 1)[1]: h.get_tensor(k).double() for k in h.keys() if k.startswith(stem + ".")}
    r = t["hada_w1_b"].shape[0]
    if "hada_t1" in t:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
    else:
        m1, m2 = t["hada_w1_a"] @ t["hada_w1_b"], t["hada_w2_a"] @ t["hada_w2_b"]
    return (m1 * m2 * float(t["alpha"]) / r).reshape(shape)


def test_lycoris_own_merge_agrees_where_its_scale_is_one(tmp_path: Path) -> None:
    """LyCORIS' merge_to (4.1.x) applies alpha/r twice for LoHa/LoKr; with alpha = r it equals its
    forward pass and ours. (Elsewhere ours equals the forward pass: see the test above.)"""
    torch.manual_seed(3)
    model = Tiny()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    net = lycoris.create_lycoris(model, 1.0, linear_dim=4, linear_alpha=4, algo="loha", preset="full")
    net.apply_to()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    f = tmp_path / "loha.safetensors"
    net.save_weights(str(f), torch.float32, None)
    with torch.no_grad():
        net.merge_to(1.0)
    theirs = {k: v.detach() for k, v in model.state_dict().items() if "lycoris" not in k and "lora" not in k}
    out = tmp_path / "m.safetensors"
    loratools.merge(base, [f], out)
    ours = load_file(str(out))
    for k, v in ours.items():
        assert torch.allclose(v, theirs[k], rtol=0, atol=1e-6), k


def test_kohya_round_trip_gives_every_tensor_back(tmp_path: Path) -> None:
    for name in ("loha-tucker", "lokr-tucker", "lokr-dora", "full"):
        d = tmp_path / name
        d.mkdir()
        base, f, _ = make(d, CASES[name])
        out = d / "back"
        loratools.convert(f, out, to="kohya", base=base)
        written = out / "pytorch_lora_weights.safetensors"
        want, got = load_file(str(f)), load_file(str(written))
        assert set(got) == set(want), name
        for k in want:
            assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), (name, k)


def test_mixed_file_each_module_its_own_kind(tmp_path: Path) -> None:
    """Plain LoRA on one module, LoKr on another, LoHa on a third, in one kohya-style file."""
    parts = {}
    want_dw = {}
    for name, target in (("lokr", "conv3"), ("loha", "proj")):
        d = tmp_path / name
        d.mkdir()
        base, f, _ = make(d, CASES[name])
        keep = {k: v for k, v in load_file(str(f)).items() if k.startswith(f"lycoris_{target}.")}
        parts.update(keep)
    g = torch.Generator().manual_seed(9)
    parts["lycoris_conv1.lora_down.weight"] = torch.randn(2, 8, 1, 1, generator=g)
    parts["lycoris_conv1.lora_up.weight"] = torch.randn(16, 2, 1, 1, generator=g)
    parts["lycoris_conv1.alpha"] = torch.tensor(1.0)
    mixed = tmp_path / "mixed.safetensors"
    save_file(parts, str(mixed))
    ad = loratools.load_adapter(mixed, base=base)
    kinds = {t.split(".")[0]: m.delta.kind for t, m in ad.modules.items()}
    assert kinds == {"proj": "loha", "conv1": "lowrank", "conv3": "lokr"}
    out = tmp_path / "m.safetensors"
    loratools.merge(base, [mixed], out)
    merged, original = load_file(str(out)), load_file(str(base))
    for target, m in ad.modules.items():
        want_dw[target] = loratools.delta(m, dtype=torch.float64)
        assert torch.allclose(merged[target].double(), original[target].double() + want_dw[target], atol=2e-6)
    lora = want_dw["conv1.weight"].reshape(16, 8)
    assert torch.allclose(lora, 0.5 * parts["lycoris_conv1.lora_up.weight"].double().reshape(16, 2)
                          @ parts["lycoris_conv1.lora_down.weight"].double().reshape(2, 8))


def test_to_lora_is_the_best_rank_r_approximation(tmp_path: Path) -> None:
    """resize: each module's error equals Eckart–Young's (the tail of ΔW's singular values, float64)."""
    base, f, _ = make(tmp_path, CASES["loha"])
    ad = loratools.load_adapter(f, base=base)
    out = tmp_path / "lora"
    result = loratools.convert(f, out, to="peft", base=base, to_lora=True, rank=3)
    got = loratools.load_adapter(out)
    assert {m.delta.kind for m in got.modules.values()} == {"lowrank"}
    assert len(result.approximated) == 3
    for report in result.approximated:
        m = ad.modules[report.target]
        s = torch.linalg.svdvals(m.delta.matrix(dtype=torch.float64))
        best = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert report.relative_error == pytest.approx(best, rel=1e-6, abs=1e-9)
        dw = got.modules[report.target].delta.matrix(dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(dw - m.delta.matrix(dtype=torch.float64))) == pytest.approx(
            best * float(s.square().sum().sqrt()), rel=1e-4)


def test_cli_info_names_the_kinds_and_other_formats_refuse_by_module(tmp_path: Path) -> None:
    base, f, _ = make(tmp_path, CASES["lokr"])
    res = CliRunner().invoke(cli, ["info", str(f), "--json"])
    assert res.exit_code == 0, res.output
    assert {m["delta"] for m in json.loads(res.output)["module_list"]} == {"lokr"}
    res = CliRunner().invoke(cli, ["info", str(f)])
    assert "3 module(s) (lokr)" in res.output and "conv lokr" in res.output
    res = CliRunner().invoke(cli, ["convert", str(f), str(tmp_path / "x"), "--to", "mlx", "--base", str(base)])
    assert res.exit_code == 1 and "lokr" in res.output and "conv3" in res.output and "--to-lora" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x").exists()
    res = CliRunner().invoke(cli, ["convert", str(f), str(tmp_path / "x"), "--to", "kohya", "--base", str(base),
                                   "--to-lora", "--rank", "2"])
    assert res.exit_code == 0, res.output
    assert "proj.weight: from lokr" in res.output and "relative error" in res.output
    assert {m.delta.kind for m in loratools.load_adapter(tmp_path / "x", base=base).modules.values()} == {"lowrank"}


@pytest.mark.parametrize("name", ["ia3", "oft-rescaled-constrained", "boft-rescaled-constrained"])
def test_changes_that_depend_on_the_weight_unmerge_and_verify(tmp_path: Path, name: str) -> None:
    """(IA)³ and OFT/BOFT are functions of W: unmerge inverts them (within the float32 bound; with
    --reversible bit for bit), --verify-full and the sample check agree, weight 0.5 interpolates
    from the identity as LyCORIS' multiplier does."""
    base, f, _ = make(tmp_path, CASES[name])
    merged, back = tmp_path / "m.safetensors", tmp_path / "b.safetensors"
    assert loratools.merge(base, [f], merged, verify="full").verify.ok
    loratools.unmerge(merged, [f], back)
    original, restored = load_file(str(base)), load_file(str(back))
    for k in original:
        assert torch.allclose(original[k], restored[k], rtol=0, atol=5e-6), k
    loratools.merge(base, [f], merged, reversible=True, overwrite=True)
    loratools.unmerge(merged, [f], back, overwrite=True)
    restored = load_file(str(back))
    assert all(torch.equal(original[k], restored[k]) for k in original)
    half = tmp_path / "half.safetensors"
    loratools.merge(base, [f], half, weights=[0.5])
    torch.manual_seed(0)
    model = Tiny()
    model.load_state_dict({k: v.float() for k, v in load_file(str(base)).items()})
    net = lycoris.create_lycoris(model, 0.5, linear_dim=4, linear_alpha=2, preset="full", **CASES[name])
    net.apply_to()
    net.load_weights(str(f))
    net.multiplier = 0.5
    for lo in net.loras:
        lo.multiplier = 0.5
    with torch.no_grad():
        want = model(*INPUTS)
    close(outputs(half), want)


def test_ia3_on_input(tmp_path: Path) -> None:
    """LyCORIS (IA)³ with on_input (factors per input column), made with its own module."""
    from lycoris.modules.ia3 import IA3Module

    torch.manual_seed(4)
    model = Tiny()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base))
    tensors = {}
    mods = []
    for name in ("proj", "conv3"):
        mod = IA3Module(f"lycoris_{name}", getattr(model, name), 1.0, train_on_input=True)
        with torch.no_grad():
            mod.weight.copy_(torch.randn(mod.weight.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
        tensors.update({f"lycoris_{name}.{k}": v.detach().float().contiguous() for k, v in mod.state_dict().items()
                        if k in ("weight", "on_input")})
        mods.append(mod)
    for mod in mods:
        mod.apply_to()
    assert float(tensors["lycoris_proj.on_input"]) == 1.0 and tensors["lycoris_proj.weight"].numel() == 16
    f = tmp_path / "ia3.safetensors"
    save_file(tensors, str(f))
    with torch.no_grad():
        want = model(*INPUTS)
    out = tmp_path / "m.safetensors"
    loratools.merge(base, [f], out)
    close(outputs(out), want)
    loratools.convert(f, tmp_path / "back", to="kohya", base=base)
    got = load_file(str(tmp_path / "back" / "pytorch_lora_weights.safetensors"))
    assert set(got) == set(tensors) and all(torch.equal(got[k], tensors[k]) for k in tensors)
    # as PEFT's own IA3 (feed-forward modules: inputs scaled), loaded by PEFT
    import peft

    loratools.convert(f, tmp_path / "peft", to="peft", base=base)
    fresh = Tiny()
    fresh.load_state_dict(load_file(str(base)))
    pm = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        close(pm(*INPUTS), want)


def test_weight_dependent_changes_are_refused_where_a_delta_alone_is_needed(tmp_path: Path) -> None:
    d = tmp_path / "ia3"
    d.mkdir()
    ibase, ia3, _ = make(d, CASES["ia3"])  # on outputs: PEFT's IA3 would scale the biases too
    res = CliRunner().invoke(cli, ["convert", str(ia3), str(d / "x"), "--to", "peft", "--base", str(ibase)])
    assert res.exit_code == 1 and "bias" in res.output and not (d / "x").exists()
    base, f, _ = make(tmp_path, CASES["oft"])
    res = CliRunner().invoke(cli, ["convert", str(f), str(tmp_path / "x"), "--to", "peft", "--base", str(base),
                                   "--to-lora", "--rank", "2"])
    assert res.exit_code == 1 and "oft" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_sd_unet_file_with_kohya_names(tmp_path: Path, algo: str) -> None:
    """A LyCORIS file for an SD1-style UNet, keys named ``lora_unet_…`` as sd-scripts/A1111 files
    are, binds through kohya name resolution to the diffusers UNet folder and merges to LyCORIS'
    forward pass."""
    from diffusers import UNet2DConditionModel

    from tests import models

    folder = models.save_tiny_unet(tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    net = lycoris.create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=1, algo=algo, preset="attn-mlp", factor=4)
    net.apply_to()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    saved = tmp_path / "raw.safetensors"
    net.save_weights(str(saved), torch.float32, None)
    f = tmp_path / f"{algo}.safetensors"
    save_file({k.replace("lycoris_", "lora_unet_", 1): v for k, v in load_file(str(saved)).items()}, str(f))
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3]), torch.randn(1, 5, 16, generator=g))
    with torch.no_grad():
        want = unet(*args).sample
    out = tmp_path / "merged"
    result = loratools.merge(folder, [f], out)
    assert len(result.changed) == len({k.split(".")[0] for k in load_file(str(saved))}) > 10
    merged = UNet2DConditionModel.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(*args).sample
    assert float((got - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_stack_and_resize_take_lycoris_deltas_and_refuse_transforms(tmp_path: Path) -> None:
    base, f, _ = make(tmp_path, CASES["loha"])
    g = torch.Generator().manual_seed(2)
    plain = tmp_path / "plain.safetensors"
    save_file({"lycoris_proj.lora_down.weight": torch.randn(2, 16, generator=g),
               "lycoris_proj.lora_up.weight": torch.randn(32, 2, generator=g), "lycoris_proj.alpha": torch.tensor(2.0)},
              str(plain))
    out = tmp_path / "cat"
    loratools.stack([f, plain], out, method="cat", base=base)
    got = loratools.load_adapter(out).modules["proj.weight"].delta.matrix(dtype=torch.float64)
    a, b = (loratools.load_adapter(p, base=base).modules["proj.weight"].delta.matrix(dtype=torch.float64)
            for p in (f, plain))
    assert torch.allclose(got, a + b, rtol=0, atol=1e-5 * float((a + b).abs().max()))
    res = CliRunner().invoke(cli, ["resize", str(f), str(tmp_path / "r"), "--rank", "3", "--base", str(base), "--json"])
    assert res.exit_code == 0, res.output
    assert {m.delta.kind for m in loratools.load_adapter(tmp_path / "r").modules.values()} == {"lowrank"}
    d = tmp_path / "oft"
    d.mkdir()
    obase, oft, _ = make(d, CASES["oft"])
    res = CliRunner().invoke(cli, ["stack", str(oft), str(oft), str(tmp_path / "x"), "--method", "cat", "--base",
                                   str(obase)])
    assert res.exit_code == 1 and "oft" in res.output and "Traceback" not in res.output


def test_swap_one_kind_for_another(tmp_path: Path) -> None:
    """swap: W'' = W' − ΔW_LoHa + f(W)…: a LoHa merge swapped for a LoKr equals merging the LoKr alone."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    base, loha, _ = make(a, CASES["loha"])
    _, lokr, want = make(b, CASES["lokr"])  # same seed: the same base
    merged, swapped = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    loratools.merge(base, [loha], merged)
    assert loratools.swap(merged, loha, lokr, swapped).verify.ok
    close(outputs(swapped), want, tol=5e-6)


def test_comfyui_native_names(tmp_path: Path) -> None:
    """ComfyUI / BFL names (``diffusion_model.<dotted path>.<role>``): full diffs with diff_b, LoRA
    pairs with their alpha (applied: alpha / r), LyCORIS kinds — bound by suffix to a checkpoint
    whose keys carry ``model.diffusion_model.``; float64 and LyCORIS' forward pass as oracles."""
    base, f, want = make(tmp_path, CASES["loha"])
    prefixed = tmp_path / "ckpt.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in load_file(str(base)).items()}, str(prefixed))
    g = torch.Generator().manual_seed(8)
    comfy = {k.replace("lycoris_", "diffusion_model.", 1): v for k, v in load_file(str(f)).items()
             if k.startswith("lycoris_conv3.")}  # LoHa on conv3
    diff, diff_b = torch.randn(32, 16, generator=g) * 0.1, torch.randn(32, generator=g) * 0.1
    comfy["diffusion_model.proj.diff"], comfy["diffusion_model.proj.diff_b"] = diff, diff_b
    up, down = torch.randn(16, 2, 1, 1, generator=g), torch.randn(2, 8, 1, 1, generator=g)
    comfy["diffusion_model.conv1.lora_B.weight"], comfy["diffusion_model.conv1.lora_A.weight"] = up, down
    comfy["diffusion_model.conv1.alpha"] = torch.tensor(3.0)
    cf = tmp_path / "comfy.safetensors"
    save_file(comfy, str(cf))
    ad = loratools.load_adapter(cf, base=prefixed)
    assert {t: m.delta.kind for t, m in ad.modules.items()} == {
        "model.diffusion_model.conv1.weight": "lowrank", "model.diffusion_model.conv3.weight": "loha",
        "model.diffusion_model.proj.weight": "full"}
    out = tmp_path / "m.safetensors"
    loratools.merge(prefixed, [cf], out)
    merged, original = load_file(str(out)), load_file(str(prefixed))
    p = "model.diffusion_model."
    exact = {p + "proj.weight": original[p + "proj.weight"].double() + diff.double(),
             p + "proj.bias": original[p + "proj.bias"].double() + diff_b.double(),
             p + "conv1.weight": original[p + "conv1.weight"].double()
             + 1.5 * (up.double().reshape(16, 2) @ down.double().reshape(2, 8)).reshape(16, 8, 1, 1)}
    for k, v in exact.items():
        assert torch.allclose(merged[k].double(), v, rtol=0, atol=4e-7 * float(v.abs().max())), k
    model = Tiny()
    model.load_state_dict({k[len(p):]: v for k, v in merged.items()})
    with torch.no_grad():
        got = model(*INPUTS)
    close(got[2:], want[2:])  # conv3: the LoHa, against LyCORIS' forward pass
