"""Wan LoRAs in their three namings — original / ComfyUI (``diffusion_model.blocks.N.self_attn.q``),
musubi-tuner's kohya flattening (``lora_unet_blocks_N_self_attn_q``) and diffusers
(``blocks.N.attn1.to_q``) — merged into a diffusers-layout WanTransformer3DModel and into an
original-layout file. Oracles: diffusers' own ``_convert_non_diffusers_wan_lora_to_diffusers`` and
``_convert_musubi_wan_lora_to_diffusers``, float64 arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools

diffusers = pytest.importorskip("diffusers")

ORIGINAL = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
            "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
            "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
            "ffn.2": "ffn.net.2"}


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> dict[str, Path]:
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                              out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                              qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    t.save_pretrained(root / "diffusers")
    sd = t.state_dict()
    original = {}
    for i in range(2):
        for o, d in ORIGINAL.items():
            for p in ("weight", "bias"):
                original[f"model.diffusion_model.blocks.{i}.{o}.{p}"] = sd[f"blocks.{i}.{d}.{p}"].contiguous()
    save_file(original, str(root / "wan.safetensors"))
    return {"diffusers": root / "diffusers", "original": root / "wan.safetensors", "sd": sd}


def _lora(wan, *, musubi: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = wan["sd"]
    out = {}
    for i in range(2):
        for k, (o, d) in enumerate(ORIGINAL.items()):
            W = sd[f"blocks.{i}.{d}.weight"]
            r = 2 + (i + k) % 2
            down, up = torch.randn(r, W.shape[1], generator=g) * 0.3, torch.randn(W.shape[0], r, generator=g) * 0.3
            alpha = torch.tensor(float(1 + k % 3))
            if musubi:
                stem = f"lora_unet_blocks_{i}_{o.replace('.', '_')}"
                out.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha})
            else:
                stem = f"diffusion_model.blocks.{i}.{o}"
                out.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": alpha})
                out[f"{stem}.diff_b"] = torch.randn(W.shape[0], generator=g) * 0.1
    return out


@pytest.mark.parametrize("musubi", [False, True])
def test_wan_lora_merges_into_the_diffusers_layout(wan, tmp_path: Path, musubi: bool) -> None:
    from diffusers.loaders.lora_conversion_utils import (_convert_musubi_wan_lora_to_diffusers,
                                                         _convert_non_diffusers_wan_lora_to_diffusers)

    lora = _lora(wan, musubi=musubi)
    f = tmp_path / "lora.safetensors"
    save_file(lora, str(f))
    convert = _convert_musubi_wan_lora_to_diffusers if musubi else _convert_non_diffusers_wan_lora_to_diffusers
    theirs = {k.removeprefix("transformer."): v for k, v in convert(dict(lora)).items()}
    out = tmp_path / "m"
    assert loratools.merge(wan["diffusers"], f, out).verify.ok
    merged = {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    names = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert len(names) == 20
    for n in names:
        exact = wan["sd"][n + ".weight"].double() + (theirs[n + ".lora_B.weight"].double()
                                                     @ theirs[n + ".lora_A.weight"].double())
        assert torch.allclose(merged[n + ".weight"].double(), exact, rtol=0, atol=4e-7 * float(exact.abs().max())), n
        if n + ".lora_B.bias" in theirs:  # diff_b: the bias change itself
            b = wan["sd"][n + ".bias"].double() + theirs[n + ".lora_B.bias"].double()
            assert torch.allclose(merged[n + ".bias"].double(), b, rtol=0, atol=4e-7 * float(b.abs().max())), n


def test_the_same_lora_in_either_naming_on_the_original_layout(wan, tmp_path: Path) -> None:
    """The original-named file merged into the original-layout file equals the same LoRA converted to
    diffusers names (loratools convert, base = the diffusers folder) merged there: renamed back exactly."""
    f = tmp_path / "lora.safetensors"
    save_file(_lora(wan, musubi=False), str(f))
    d = tmp_path / "d"
    loratools.convert(f, d, to="diffusers", base=wan["diffusers"])
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    loratools.merge(wan["original"], f, a)
    loratools.merge(wan["original"], d, b)
    A, B = load_file(str(a)), load_file(str(b))
    base = load_file(str(wan["original"]))
    assert sum(not torch.equal(A[k], base[k]) for k in A) == 40  # every weight and bias changed
    for k in A:
        assert torch.allclose(A[k], B[k], rtol=0, atol=2e-6 * max(1.0, float(A[k].abs().max()))), k
