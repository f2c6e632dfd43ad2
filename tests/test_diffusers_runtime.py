"""What loratools writes for diffusers, loaded by diffusers itself (0.42): the text-encoder and UNet
files through the pipeline's own LoRA loaders (``lora_state_dict`` → ``load_lora_into_text_encoder``
/ ``load_lora_into_unet``, what ``pipeline.load_lora_weights`` runs), compared with PEFT's forward
pass; and diffusers' kohya loader against float64 on a file with per-module alphas."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools

from . import models

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    unet = models.save_tiny_unet(root / "unet")
    clip = models.save_tiny_clip(root / "clip")
    return {
        "unet": unet, "clip": clip,
        "unet-lora": models.make_peft_adapter_on(
            UNet2DConditionModel.from_pretrained(unet), root / "unet-lora",
            dict(r=2, lora_alpha=3, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]), seed=3),
        "clip-lora": models.make_peft_adapter_on(
            CLIPTextModel.from_pretrained(clip), root / "clip-lora",
            dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2}), seed=4),
    }


def test_text_encoder_file_loads_with_the_pipeline_loader(parts, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    out = tmp_path / "d"
    loratools.convert(parts["clip-lora"], out, to="diffusers", base=parts["clip"])
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    te = CLIPTextModel.from_pretrained(parts["clip"]).eval()
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=te, prefix="text_encoder",
                                                        metadata=meta)
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    want_model = peft.PeftModel.from_pretrained(CLIPTextModel.from_pretrained(parts["clip"]), str(parts["clip-lora"]))
    with torch.no_grad():
        got, want = te(ids).last_hidden_state, want_model.eval()(ids).last_hidden_state
    err = float((got - want).abs().max())
    print(f"diffusers text encoder (load_lora_into_text_encoder): max |Δ| vs PEFT {err:.1e}")
    assert err <= 1e-5 * max(1.0, float(want.abs().max()))


def test_unet_file_loads_with_the_pipeline_loader(parts, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out = tmp_path / "d"
    loratools.convert(parts["unet-lora"], out, to="diffusers", base=parts["unet"])
    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    unet = UNet2DConditionModel.from_pretrained(parts["unet"]).eval()
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet, metadata=meta)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3]), torch.randn(1, 5, 16, generator=g))
    want_model = peft.PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(parts["unet"]),
                                                str(parts["unet-lora"])).eval()
    with torch.no_grad():
        got, want = unet(*args).sample, want_model(*args).sample
    err = float((got - want).abs().max())
    print(f"diffusers UNet (load_lora_into_unet): max |Δ| vs PEFT {err:.1e}")
    assert err <= 1e-5 * max(1.0, float(want.abs().max()))


def test_kohya_file_with_per_module_alphas(parts, tmp_path: Path) -> None:
    """loratools applies each module's own alpha (float64 oracle). diffusers' kohya loader is printed
    beside it: with one alpha for the file it agrees; with per-module alphas (0.42) it does not."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    k = tmp_path / "k"
    loratools.convert(parts["unet-lora"], k, to="kohya", base=parts["unet"])
    base = UNet2DConditionModel.from_pretrained(parts["unet"]).state_dict()
    for per_module in (False, True):
        sd = load_file(str(k / "pytorch_lora_weights.safetensors"))
        if per_module:
            for i, n in enumerate(sorted(x for x in sd if x.endswith(".alpha"))):
                sd[n] = torch.tensor(float(1 + i % 5))
        f = tmp_path / f"kohya-{per_module}.safetensors"
        save_file(sd, str(f))
        out = tmp_path / f"merged-{per_module}"
        loratools.merge(parts["unet"], [f], out)
        ours = UNet2DConditionModel.from_pretrained(out).state_dict()
        unet = UNet2DConditionModel.from_pretrained(parts["unet"])
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(f))[:2]
        StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=unet)
        unet.fuse_lora()
        theirs = unet.state_dict()
        worst_ours = worst_theirs = 0.0
        wrong = 0
        ad = loratools.load_adapter(f, base=parts["unet"])
        for t, m in ad.modules.items():
            ref = base[t].double() + loratools.delta(m, dtype=torch.float64)
            worst_ours = max(worst_ours, float((ours[t].double() - ref).abs().max()))
            fused = theirs.get(t.replace(".weight", ".base_layer.weight"), theirs.get(t))
            e = float((fused.double() - ref).abs().max())
            worst_theirs, wrong = max(worst_theirs, e), wrong + (e > 1e-5)
        print(f"kohya file, {'per-module' if per_module else 'one'} alpha: loratools max error {worst_ours:.1e}; "
              f"diffusers' kohya loader {worst_theirs:.1e} ({wrong} of {len(ad.modules)} modules off)")
        assert worst_ours <= 1e-6
        if not per_module:
            assert worst_theirs <= 1e-6  # the comparison itself is sound where diffusers is right


def test_flux_transformer_file_loads_with_the_flux_loader(tmp_path: Path) -> None:
    """A LoRA on a diffusion transformer (a tiny FluxTransformer2DModel) written for diffusers carries
    `transformer.` keys (it carried `unet.`, which Flux/SD3/Wan pipelines do not load); FluxPipeline's
    own loader takes it and the transformer's output is PEFT's."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                               axes_dims_rope=(2, 2, 4))
    t.save_pretrained(tmp_path / "flux")
    lora = models.make_peft_adapter_on(t, tmp_path / "lora", dict(
        r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp", "proj_out", "to_out.0", "add_q_proj"]),
        seed=1)
    out = tmp_path / "d"
    loratools.convert(lora, out, to="diffusers", base=tmp_path / "flux")
    keys = list(load_file(str(out / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith("transformer.") for k in keys)
    res = FluxPipeline.lora_state_dict(str(out), return_alphas=True, return_lora_metadata=True)
    state, alphas, meta = res[0], res[1], res[-1]
    mine = FluxTransformer2DModel.from_pretrained(tmp_path / "flux").eval()
    FluxPipeline.load_lora_into_transformer(state, alphas, transformer=mine, metadata=meta)
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                  pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3))
    ref = peft.PeftModel.from_pretrained(FluxTransformer2DModel.from_pretrained(tmp_path / "flux"), str(lora)).eval()
    with torch.no_grad():
        got, want = mine(**inputs).sample, ref(**inputs).sample
    err = float((got - want).abs().max())
    print(f"diffusers Flux transformer (load_lora_into_transformer): max |Δ| vs PEFT {err:.1e}")
    assert err <= 1e-5 * max(1.0, float(want.abs().max()))


def test_xlabs_flux_file_merges_into_a_bfl_layout_checkpoint(tmp_path: Path) -> None:
    """An XLabs file (``double_blocks.N.processor.qkv_lora1.down.weight`` …) merged into a BFL-layout
    checkpoint (``model.diffusion_model.double_blocks…``) equals W + ΔW where ΔW comes from diffusers'
    own ``_convert_xlabs_flux_lora_to_diffusers`` (to_q/to_k/to_v rows stacked back into qkv), float64."""
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    H, r = 16, 4
    g = torch.Generator().manual_seed(0)
    p = "model.diffusion_model.double_blocks.0."
    base = {p + "img_attn.qkv.weight": torch.randn(3 * H, H, generator=g), p + "img_attn.proj.weight": torch.randn(H, H, generator=g),
            p + "txt_attn.qkv.weight": torch.randn(3 * H, H, generator=g), p + "txt_attn.proj.weight": torch.randn(H, H, generator=g),
            p + "img_attn.qkv.bias": torch.randn(3 * H, generator=g)}
    save_file(base, str(tmp_path / "flux1.safetensors"))
    lora = {}
    for proc, out in (("qkv", 3 * H), ("proj", H)):
        for stream in "12":
            key = f"double_blocks.0.processor.{proc}_lora{stream}"
            lora[key + ".down.weight"] = torch.randn(r, H, generator=g) * 0.2
            lora[key + ".up.weight"] = torch.randn(out, r, generator=g) * 0.2
    save_file(lora, str(tmp_path / "xlabs.safetensors"))
    theirs = _convert_xlabs_flux_lora_to_diffusers(dict(lora))

    def dw(name: str) -> torch.Tensor:
        return theirs[f"{name}.lora_B.weight"].double() @ theirs[f"{name}.lora_A.weight"].double()

    t = "transformer.transformer_blocks.0.attn."
    want = {p + "img_attn.qkv.weight": torch.cat([dw(t + "to_q"), dw(t + "to_k"), dw(t + "to_v")]),
            p + "img_attn.proj.weight": dw(t + "to_out.0"),
            p + "txt_attn.qkv.weight": torch.cat([dw(t + "add_q_proj"), dw(t + "add_k_proj"), dw(t + "add_v_proj")]),
            p + "txt_attn.proj.weight": dw(t + "to_add_out")}
    out = tmp_path / "m.safetensors"
    assert loratools.merge(tmp_path / "flux1.safetensors", tmp_path / "xlabs.safetensors", out).verify.ok
    merged = load_file(str(out))
    for k, d in want.items():
        exact = base[k].double() + d
        assert torch.allclose(merged[k].double(), exact, rtol=0, atol=4e-7 * float(exact.abs().max())), k
    assert torch.equal(merged[p + "img_attn.qkv.bias"], base[p + "img_attn.qkv.bias"])
