"""Flux LoRAs across Flux's two layouts: BFL's (``double_blocks.N.img_attn.qkv``, fused, what
flux1-dev.safetensors, ComfyUI and sd-scripts use) and diffusers' (``transformer_blocks.N.attn.to_q``,
split). A tiny FluxTransformer2DModel is the diffusers base; its BFL twin is built by the inverse of
diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` table. Oracles: PEFT's
merge_and_unload, diffusers' own kohya-Flux conversion (``_convert_kohya_flux_lora_to_diffusers``),
float64 arithmetic; and the two layouts against each other (a fused row block is the same
arithmetic as its split part: bit for bit)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools

from . import models

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

DOUBLE = {"img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
          "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
          "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"], "txt_mlp.0": ["ff_context.net.0.proj"],
          "txt_mlp.2": ["ff_context.net.2"], "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"]}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
          "modulation.lin": ["norm.linear"]}


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers Flux tensors → BFL names (weights and biases of the mapped modules, rest dropped)."""
    out = {}
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for kind, table, src, ids in (("double_blocks", DOUBLE, "transformer_blocks", blocks),
                                  ("single_blocks", SINGLE, "single_transformer_blocks", singles)):
        for i in ids:
            for bfl, parts in table.items():
                for p in ("weight", "bias"):
                    keys = [f"{src}.{i}.{d}.{p}" for d in parts]
                    if all(k in sd for k in keys):
                        out[f"{kind}.{i}.{bfl}.{p}"] = torch.cat([sd[k] for k in keys])
    w = sd["norm_out.linear.weight"]
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat(w.chunk(2)[::-1])
    out["final_layer.linear.weight"] = sd["proj_out.weight"]
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    from diffusers import FluxTransformer2DModel

    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                               axes_dims_rope=(2, 2, 4))
    t.save_pretrained(root / "diffusers")
    bfl = root / "flux1.safetensors"
    twin = _bfl_twin(t.state_dict())
    # the twin's fuse is diffusers' own: its BFL → diffusers converter gives the diffusers weights back
    back = _diffusers_flux_converter(inner_dim=16)({k: v.clone() for k, v in twin.items()})
    assert set(back) == set(t.state_dict()) and all(torch.equal(back[k], v) for k, v in t.state_dict().items())
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in twin.items()}, str(bfl))
    return {"diffusers": root / "diffusers", "bfl": bfl}


def _diffusers_flux_converter(inner_dim: int):
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` with its hard-coded Flux-dev
    width (3072) set to the tiny model's — its own code otherwise, read from its source."""
    import inspect

    from diffusers.loaders import single_file_utils

    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    scope = dict(vars(single_file_utils))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), scope)  # noqa: S102
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def _bfl_twin(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the diffusers model in BFL's layout (the mapped modules by ``to_bfl``, the rest
    — embedders, norms — renamed as BFL names them)."""
    twin = to_bfl(sd)
    for p in ("weight", "bias"):
        twin[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat(sd[f"norm_out.linear.{p}"].chunk(2)[::-1])
        twin[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        for bfl, d in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                       ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                       ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                       ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                       ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")):
            twin[f"{bfl}.{p}"] = sd[f"{d}.{p}"]
    for k, v in sd.items():
        for d, b in (("attn.norm_q", "img_attn.norm.query_norm"), ("attn.norm_k", "img_attn.norm.key_norm"),
                     ("attn.norm_added_q", "txt_attn.norm.query_norm"), ("attn.norm_added_k", "txt_attn.norm.key_norm")):
            m = re.match(rf"^(single_)?transformer_blocks\.(\d+)\.{d}\.weight$", k)
            if m:
                twin[f"{'single_blocks' if m[1] else 'double_blocks'}.{m[2]}.{b if not m[1] else b.split('.', 1)[1]}"
                     f".scale"] = v
    return twin


def test_diffusers_lora_merges_into_the_bfl_checkpoint(flux, tmp_path: Path) -> None:
    """A PEFT / diffusers LoRA on the split projections, merged into the fused BFL file, equals PEFT's
    merge_and_unload of the diffusers model carried to BFL names."""
    from diffusers import FluxTransformer2DModel

    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "proj_mlp", "to_out.0", "ff.net.0.proj",
               "norm1.linear", "norm.linear", "norm_out.linear"]
    lora = models.make_peft_adapter_on(FluxTransformer2DModel.from_pretrained(flux["diffusers"]), tmp_path / "lora",
                                       dict(r=2, lora_alpha=4, target_modules=targets), seed=3)
    d = tmp_path / "d"
    loratools.convert(lora, d, to="diffusers", base=flux["diffusers"])
    out = tmp_path / "m.safetensors"
    result = loratools.merge(flux["bfl"], d, out)
    assert result.verify.ok
    merged = peft.PeftModel.from_pretrained(FluxTransformer2DModel.from_pretrained(flux["diffusers"]), str(lora))
    want = to_bfl(merged.merge_and_unload().state_dict())
    got = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(out)).items()}
    changed = 0
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k
        changed += not torch.equal(got[k], load_file(str(flux["bfl"]))["model.diffusion_model." + k])
    assert changed >= 8  # qkv ×2, linear1, mods, final layer: the split modules landed in the fused tensors


def _kohya_flux(tmp: Path, flux, *, single: bool) -> Path:
    """A kohya (sd-scripts) Flux file on BFL modules, real alphas, shapes from the BFL twin."""
    base = load_file(str(flux["bfl"]))
    g = torch.Generator().manual_seed(5)
    mods = ["double_blocks_0_img_attn_qkv", "double_blocks_0_txt_attn_qkv", "double_blocks_0_img_attn_proj",
            "double_blocks_0_img_mlp_0", "double_blocks_0_txt_mod_lin"]
    if single:
        mods += ["single_blocks_0_linear1", "single_blocks_0_linear2", "final_layer_adaLN_modulation_1"]
    sd = {}
    for i, mname in enumerate(mods):
        dotted = mname.replace("double_blocks_0_", "double_blocks.0.").replace("single_blocks_0_", "single_blocks.0.")
        dotted = {"final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1"}.get(mname, dotted)
        for a, b in (("img_attn_", "img_attn."), ("txt_attn_", "txt_attn."), ("img_mlp_", "img_mlp."),
                     ("txt_mod_", "txt_mod."), ("modulation_lin", "modulation.lin")):
            dotted = dotted.replace(a, b)
        W = base[f"model.diffusion_model.{dotted}.weight"]
        r = 2 + i % 2
        sd[f"lora_unet_{mname}.lora_down.weight"] = torch.randn(r, W.shape[1], generator=g) * 0.3
        sd[f"lora_unet_{mname}.lora_up.weight"] = torch.randn(W.shape[0], r, generator=g) * 0.3
        sd[f"lora_unet_{mname}.alpha"] = torch.tensor(float(1 + i))
    f = tmp / f"kohya-{single}.safetensors"
    save_file(sd, str(f))
    return f


def test_kohya_flux_file_on_both_layouts(flux, tmp_path: Path) -> None:
    """sd-scripts' Flux names merge into the BFL file (by name) and into the diffusers folder (fused
    modules cut by rows): the two results are the same numbers, bit for bit."""
    f = _kohya_flux(tmp_path, flux, single=True)
    a, b = tmp_path / "bfl.safetensors", tmp_path / "diffusers"
    loratools.merge(flux["bfl"], f, a)
    loratools.merge(flux["diffusers"], f, b)
    from_bfl = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(a)).items()}
    from_diffusers = to_bfl({k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(str(p)).items()})
    for k, v in from_diffusers.items():
        assert torch.equal(v, from_bfl[k]), k


def test_kohya_flux_double_blocks_against_diffusers_conversion(flux, tmp_path: Path) -> None:
    """The same file's double-block modules against diffusers' own kohya-Flux converter (which
    hard-codes Flux-dev's single-block sizes, so single blocks are left out here): W + ΔW, float64."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    f = _kohya_flux(tmp_path, flux, single=False)
    out = tmp_path / "m"
    loratools.merge(flux["diffusers"], f, out)
    ait = _convert_kohya_flux_lora_to_diffusers(load_file(str(f)))
    base = FluxTransformer2DModel.from_pretrained(flux["diffusers"]).state_dict()
    merged = {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    names = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in ait if k.endswith(".lora_A.weight")}
    assert len(names) >= 9
    for n in names:
        dw = ait[f"transformer.{n}.lora_B.weight"].double() @ ait[f"transformer.{n}.lora_A.weight"].double()
        exact = base[n + ".weight"].double() + dw
        assert torch.allclose(merged[n + ".weight"].double(), exact, rtol=0, atol=4e-7 * float(exact.abs().max())), n


def test_kohya_flux_converted_for_diffusers_loads_in_flux_pipeline(flux, tmp_path: Path) -> None:
    """`convert --to diffusers --base <diffusers Flux>` of an sd-scripts Flux file: FluxPipeline's own
    loader takes it, and its fused weights are loratools' merge of the kohya file."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    f = _kohya_flux(tmp_path, flux, single=True)
    d = tmp_path / "d"
    loratools.convert(f, d, to="diffusers", base=flux["diffusers"])
    res = FluxPipeline.lora_state_dict(str(d), return_alphas=True, return_lora_metadata=True)
    t = FluxTransformer2DModel.from_pretrained(flux["diffusers"])
    FluxPipeline.load_lora_into_transformer(res[0], res[1], transformer=t, metadata=res[-1])
    t.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v for k, v in t.state_dict().items() if "lora_" not in k}
    out = tmp_path / "m"
    loratools.merge(flux["diffusers"], f, out)
    ours = {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    for k, v in ours.items():
        assert torch.allclose(theirs[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k


def test_lycoris_kinds_on_fused_and_split_layouts(flux, tmp_path: Path) -> None:
    """LyCORIS modules on BFL's fused projections (LoKr on img_attn.qkv, LoHa on txt_attn.qkv, a full
    diff with diff_b on single_blocks.0.linear1) merged into both layouts: rows of each kind's ΔW land
    in the split tensors exactly (bit for bit against the fused merge)."""
    g = torch.Generator().manual_seed(9)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    lora = {
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": r(4, 4), "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_a": r(12, 2),
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2_b": r(2, 4), "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
        "lora_unet_double_blocks_0_txt_attn_qkv.hada_w1_a": r(48, 2), "lora_unet_double_blocks_0_txt_attn_qkv.hada_w1_b": r(2, 16),
        "lora_unet_double_blocks_0_txt_attn_qkv.hada_w2_a": r(48, 2), "lora_unet_double_blocks_0_txt_attn_qkv.hada_w2_b": r(2, 16),
        "lora_unet_double_blocks_0_txt_attn_qkv.alpha": torch.tensor(4.0),
        "lora_unet_single_blocks_0_linear1.diff": r(48 + 64, 16), "lora_unet_single_blocks_0_linear1.diff_b": r(48 + 64),
    }
    f = tmp_path / "lyco.safetensors"
    save_file(lora, str(f))
    a, b = tmp_path / "a.safetensors", tmp_path / "b"
    loratools.merge(flux["bfl"], f, a)
    rb = loratools.merge(flux["diffusers"], f, b)
    assert rb.verify.ok and len(rb.changed) == 3 + 3 + 4 + 4  # q/k/v ×2, linear1's 4 parts and their biases
    from_bfl = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(a)).items()}
    from_diffusers = to_bfl({k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(str(p)).items()})
    for k, v in from_diffusers.items():
        assert torch.equal(v, from_bfl[k]), k


def test_peft_loha_on_split_projections_merges_into_the_fused_file(flux, tmp_path: Path) -> None:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel.from_pretrained(flux["diffusers"])
    pm = peft.get_peft_model(model, peft.LoHaConfig(r=2, alpha=3, target_modules=["to_q", "to_k", "to_v", "proj_mlp"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "hada_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "loha")
    want = to_bfl(pm.merge_and_unload().state_dict())
    out = tmp_path / "m.safetensors"
    assert loratools.merge(flux["bfl"], tmp_path / "loha", out).verify.ok
    got = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(out)).items()}
    for k, v in want.items():
        assert torch.allclose(got[k], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), k


def test_onetrainer_names_merge_into_the_fused_file(flux, tmp_path: Path) -> None:
    """kohya-flattened diffusers names (OneTrainer / SimpleTuner: lora_transformer_transformer_blocks_0_attn_to_q),
    here written by loratools from a PEFT LoRA on the diffusers model, merged into the BFL file."""
    from diffusers import FluxTransformer2DModel

    lora = models.make_peft_adapter_on(FluxTransformer2DModel.from_pretrained(flux["diffusers"]), tmp_path / "lora",
                                       dict(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp",
                                                                               "norm_out.linear"]), seed=6)
    k = tmp_path / "k"
    loratools.convert(lora, k, to="kohya", base=flux["diffusers"])
    keys = list(load_file(str(k / "pytorch_lora_weights.safetensors")))
    assert any(x.startswith("lora_transformer_single_transformer_blocks_0_attn_to_q") for x in keys)
    save_file(load_file(str(k / "pytorch_lora_weights.safetensors")), str(tmp_path / "ot.safetensors"))  # no metadata
    out = tmp_path / "m.safetensors"
    assert loratools.merge(flux["bfl"], tmp_path / "ot.safetensors", out).verify.ok
    merged = peft.PeftModel.from_pretrained(FluxTransformer2DModel.from_pretrained(flux["diffusers"]), str(lora))
    want = to_bfl(merged.merge_and_unload().state_dict())
    got = {x.removeprefix("model.diffusion_model."): v for x, v in load_file(str(out)).items()}
    for name, v in want.items():
        assert torch.allclose(got[name], v, rtol=0, atol=2e-6 * max(1.0, float(v.abs().max()))), name


def test_comfyui_bfl_names_on_the_diffusers_layout(flux, tmp_path: Path) -> None:
    """The same LoRA under ComfyUI / BFL names (diffusion_model.double_blocks.0.img_attn.qkv.lora_A…,
    .alpha) merged into the diffusers folder equals the sd-scripts-named file's merge, bit for bit."""
    f = _kohya_flux(tmp_path, flux, single=True)
    def comfy(key: str) -> str:
        stem, _, role = key.partition(".")
        body = stem.removeprefix("lora_unet_")
        body = re.sub(r"^(double_blocks|single_blocks)_(\d+)_", r"\1.\2.", body)
        for a, b in (("img_attn_", "img_attn."), ("txt_attn_", "txt_attn."), ("img_mlp_", "img_mlp."),
                     ("txt_mod_", "txt_mod."), ("modulation_lin", "modulation.lin"),
                     ("final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1")):
            body = body.replace(a, b)
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(role, role)
        return f"diffusion_model.{body}.{role}"

    c = tmp_path / "comfy.safetensors"
    save_file({comfy(k): v for k, v in load_file(str(f)).items()}, str(c))
    a, b = tmp_path / "a", tmp_path / "b"
    loratools.merge(flux["diffusers"], f, a)
    loratools.merge(flux["diffusers"], c, b)
    A = {k: v for p in sorted(a.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    B = {k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    base = {k: v for p in sorted(flux["diffusers"].glob("*.safetensors")) for k, v in load_file(str(p)).items()}
    assert sum(not torch.equal(A[k], base[k]) for k in A) >= 12
    assert all(torch.equal(A[k], B[k]) for k in A)
