"""Diffusion-transformer LoRA files in their producers' own key layouts, loaded by diffusers itself
(the pipeline's ``lora_state_dict`` runs diffusers' converter for that layout, then
``load_lora_into_transformer``), against loratools' merge of the same file and loratools' converted
``--to diffusers`` file loaded the same way: forward pass against forward pass on tiny Flux and Wan
transformers."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loratools

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4))


def _flux_inputs() -> dict:
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(1, 4, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                pooled_projections=torch.randn(1, 8, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(4, 3), txt_ids=torch.zeros(3, 3))


def _wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan_inputs() -> dict:
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(1, 4, 1, 4, 4, generator=g), timestep=torch.tensor([3]),
                encoder_hidden_states=torch.randn(1, 3, 16, generator=g))


def _diffusers_forward(pipeline, make, folder: Path, lora: Path, inputs: dict) -> torch.Tensor:
    """diffusers' own loading of a LoRA file onto the transformer, then its forward."""
    res = pipeline.lora_state_dict(str(lora), return_lora_metadata=True)
    state, meta = (res[0], res[-1]) if isinstance(res, tuple) else (res, None)
    t = type(make()).from_pretrained(folder).eval()
    takes_alphas = "network_alphas" in inspect.signature(pipeline.load_lora_into_transformer).parameters
    pipeline.load_lora_into_transformer(*((state, None) if takes_alphas else (state,)), transformer=t, metadata=meta)
    with torch.no_grad():
        return t(**inputs).sample


def _check(pipeline, make, inputs, lora_sd: dict, tmp: Path, name: str) -> None:
    folder = tmp / "base"
    make().save_pretrained(folder)
    f = tmp / f"{name}.safetensors"
    save_file(lora_sd, str(f))
    theirs = _diffusers_forward(pipeline, make, folder, f, inputs)
    merged = tmp / "merged"
    loratools.merge(folder, f, merged)
    with torch.no_grad():
        ours = type(make()).from_pretrained(merged).eval()(**inputs).sample
    converted = tmp / "converted"
    loratools.convert(f, converted, to="diffusers", base=folder)
    again = _diffusers_forward(pipeline, make, folder, converted / "pytorch_lora_weights.safetensors", inputs)
    with torch.no_grad():
        plain = type(make()).from_pretrained(folder).eval()(**inputs).sample
    scale = max(1.0, float(theirs.abs().max()))
    e1, e2 = float((ours - theirs).abs().max()), float((again - theirs).abs().max())
    print(f"{name}: loratools merge vs diffusers' loading {e1:.1e}; loratools' diffusers file {e2:.1e}")
    assert float((theirs - plain).abs().max()) > 1e-3 * scale  # the LoRA does something
    assert e1 <= 1e-5 * scale and e2 <= 1e-5 * scale


def _pair(g, rows: int, cols: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, cols, generator=g) * 0.3, torch.randn(rows, r, generator=g) * 0.3


def test_kohya_flux(tmp_path: Path) -> None:
    """sd-scripts names (fused qkv) on the diffusers layout; double blocks only: diffusers' kohya-Flux
    converter hard-codes Flux-dev's single-block sizes."""
    from diffusers import FluxPipeline

    sd = _flux().state_dict()
    g = torch.Generator().manual_seed(4)
    lora = {}
    for i in range(2):
        for mod, rows, cols, alpha in (("img_attn_qkv", 48, 16, 2.0), ("txt_attn_qkv", 48, 16, 3.0),
                                       ("img_attn_proj", 16, 16, 1.0), ("img_mlp_0", 64, 16, 4.0),
                                       ("txt_mlp_2", 16, 64, 2.0), ("img_mod_lin", 96, 16, 1.0)):
            down, up = _pair(g, rows, cols, 2)
            stem = f"lora_unet_double_blocks_{i}_{mod}"
            lora.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)})
    assert sd["transformer_blocks.0.ff.net.0.proj.weight"].shape == (64, 16)
    _check(FluxPipeline, _flux, _flux_inputs(), lora, tmp_path, "kohya Flux")


def test_xlabs_flux(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(5)
    lora = {}
    for i in range(2):
        for proc, rows in (("qkv", 48), ("proj", 16)):
            for stream in "12":
                down, up = _pair(g, rows, 16, 4)
                lora[f"double_blocks.{i}.processor.{proc}_lora{stream}.down.weight"] = down
                lora[f"double_blocks.{i}.processor.{proc}_lora{stream}.up.weight"] = up
    _check(FluxPipeline, _flux, _flux_inputs(), lora, tmp_path, "XLabs Flux")


@pytest.mark.parametrize("musubi", [False, True])
def test_wan(tmp_path: Path, musubi: bool) -> None:
    from diffusers import WanPipeline

    g = torch.Generator().manual_seed(6)
    lora = {}
    names = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k", "cross_attn.v",
             "cross_attn.o", "ffn.0", "ffn.2"]
    for i in range(2):
        for k, o in enumerate(names):
            rows, cols = {"ffn.0": (32, 16), "ffn.2": (16, 32)}.get(o, (16, 16))
            down, up = _pair(g, rows, cols, 2)
            alpha = torch.tensor(float(1 + k % 3))
            if musubi:
                stem = f"lora_unet_blocks_{i}_{o.replace('.', '_')}"
                lora.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha})
            else:
                stem = f"diffusion_model.blocks.{i}.{o}"
                lora.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": alpha})
    _check(WanPipeline, _wan, _wan_inputs(), lora, tmp_path, "Wan musubi" if musubi else "Wan original")


def _fused_by_diffusers(pipeline, model, lora: Path) -> dict[str, torch.Tensor]:
    """diffusers' own loading of a LoRA file onto ``model``, fused into its weights."""
    res = pipeline.lora_state_dict(str(lora), return_lora_metadata=True)
    state, meta = (res[0], res[-1]) if isinstance(res, tuple) else (res, None)
    takes_alphas = "network_alphas" in inspect.signature(pipeline.load_lora_into_transformer).parameters
    pipeline.load_lora_into_transformer(*((state, None) if takes_alphas else (state,)), transformer=model, metadata=meta)
    model.fuse_lora()
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("family", ["ltx", "qwen"])
def test_ltx_and_qwen_image_files_bind_through_the_same_names(tmp_path: Path, family: str) -> None:
    """LTX-Video files in ComfyUI names (diffusion_model.transformer_blocks…) and Qwen-Image files in
    sd-scripts names (lora_unet_transformer_blocks_0_attn_to_q, real alphas) need no map of their own:
    merged by loratools they equal what diffusers' loader (its converter) fuses into the model."""
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel, QwenImagePipeline, QwenImageTransformer2DModel

    torch.manual_seed(0)
    if family == "ltx":
        make = lambda: LTXVideoTransformer3DModel(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1,  # noqa: E731
                                                  num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                                  num_layers=1, caption_channels=16)
        pipeline, mods = LTXPipeline, ["attn1.to_q", "attn1.to_k", "attn2.to_v", "ff.net.0.proj"]
    else:
        make = lambda: QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,  # noqa: E731
                                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                   axes_dims_rope=(2, 2, 4))
        pipeline, mods = QwenImagePipeline, ["attn.to_q", "attn.add_k_proj", "img_mlp.net.0.proj", "attn.to_out.0"]
    model = make()
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    sd = model.state_dict()
    g = torch.Generator().manual_seed(7)
    lora = {}
    for i, mod in enumerate(mods):
        W = sd[f"transformer_blocks.0.{mod}.weight"]
        down, up = _pair(g, W.shape[0], W.shape[1], 2)
        if family == "ltx":
            stem = f"diffusion_model.transformer_blocks.0.{mod}"
            lora.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up})
        else:
            stem = f"lora_unet_transformer_blocks_0_{mod.replace('.', '_')}"
            lora.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                         f"{stem}.alpha": torch.tensor(float(1 + i))})
    f = tmp_path / f"{family}.safetensors"
    save_file(lora, str(f))
    theirs = _fused_by_diffusers(pipeline, type(model).from_pretrained(folder), f)
    out = tmp_path / "m"
    result = loratools.merge(folder, f, out)
    assert len(result.changed) == len(mods)
    ours = type(model).from_pretrained(out).state_dict()
    for k, v in ours.items():
        assert torch.allclose(v, theirs[k], rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k
