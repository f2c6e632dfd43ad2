"""SD3 / SD3.5 LoRAs across SD3's two layouts: the original MMDiT checkpoint (``joint_blocks.N.
x_block.attn.qkv``, fused; what sd-scripts and ComfyUI use) and diffusers' SD3Transformer2DModel
(``transformer_blocks.N.attn.to_q``…). The test's own map to the original layout is checked against
diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (the oracle); then an sd-scripts-named
LoRA merged into both layouts must give the same numbers, bit for bit (a fused row block is the same
arithmetic as its split part), including the last block's swapped (shift, scale) halves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import loratools

diffusers = pytest.importorskip("diffusers")

JOINT = {"x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
         "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
         "x_block.attn.proj": ["attn.to_out.0"], "context_block.attn.proj": ["attn.to_add_out"],
         "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"], "x_block.attn2.proj": ["attn2.to_out.0"],
         "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
         "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
         "x_block.adaLN_modulation.1": ["norm1.linear"], "context_block.adaLN_modulation.1": ["norm1_context.linear"]}
GLOBAL = {"x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
          "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
          "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
          "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
          "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
          "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    last = max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(last + 1):
        for orig, parts in JOINT.items():
            for p in ("weight", "bias"):
                keys = [f"transformer_blocks.{i}.{d}.{p}" for d in parts]
                if all(k in sd for k in keys):
                    t = torch.cat([sd[k] for k in keys])
                    out[f"joint_blocks.{i}.{orig}.{p}"] = _swap(t) if (
                        i == last and orig == "context_block.adaLN_modulation.1") else t
    for orig, d in GLOBAL.items():
        for p in ("weight", "bias"):
            t = sd[f"{d}.{p}"]
            out[f"{orig}.{p}"] = _swap(t) if orig == "final_layer.adaLN_modulation.1" else t
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> dict:
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,))
    t.save_pretrained(root / "diffusers")
    sd = {k: v.contiguous() for k, v in t.state_dict().items()}
    original = to_original(sd)
    back = convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in original.items()})
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)  # the test's map is diffusers'
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, str(root / "sd3.safetensors"))
    return {"diffusers": root / "diffusers", "original": root / "sd3.safetensors", "sd": original}


def test_sd_scripts_sd3_lora_on_both_layouts(sd3, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    mods = ["joint_blocks_0_x_block_attn_qkv", "joint_blocks_0_context_block_attn_qkv", "joint_blocks_0_x_block_attn_proj",
            "joint_blocks_0_x_block_attn2_qkv", "joint_blocks_0_x_block_mlp_fc1", "joint_blocks_1_context_block_adaLN_modulation_1",
            "joint_blocks_0_context_block_adaLN_modulation_1", "final_layer_adaLN_modulation_1", "final_layer_linear",
            "context_embedder"]
    flat = {k.replace(".", "_"): k for k in sd3["sd"]}
    lora = {}
    for i, m in enumerate(mods):
        W = sd3["sd"][flat[m + "_weight"]]
        r = 2 + i % 2
        lora[f"lora_unet_{m}.lora_down.weight"] = torch.randn(r, W.shape[1], generator=g) * 0.3
        lora[f"lora_unet_{m}.lora_up.weight"] = torch.randn(W.shape[0], r, generator=g) * 0.3
        lora[f"lora_unet_{m}.alpha"] = torch.tensor(float(1 + i % 4))
    f = tmp_path / "sd3-lora.safetensors"
    save_file(lora, str(f))
    a, b = tmp_path / "a.safetensors", tmp_path / "b"
    ra = loratools.merge(sd3["original"], f, a)
    rb = loratools.merge(sd3["diffusers"], f, b)
    assert len(ra.changed) == len(mods) and len(rb.changed) > len(mods)
    from_original = {k.removeprefix("model.diffusion_model."): v for k, v in load_file(str(a)).items()}
    from_diffusers = to_original({k: v for p in sorted(b.glob("*.safetensors")) for k, v in load_file(str(p)).items()})
    for k, v in from_diffusers.items():
        assert torch.equal(v, from_original[k]), k
