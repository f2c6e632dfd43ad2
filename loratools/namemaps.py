"""Module-name maps between the layouts one model ships in, where they are plain renames.

Wan 2.1 / 2.2 (T2V and I2V): the original checkpoints (``diffusion_model.blocks.N.self_attn.q``,
what Wan's own code, ComfyUI and musubi-tuner use; musubi flattens them as kohya does,
``lora_unet_blocks_0_self_attn_q``) and diffusers' ``WanTransformer3DModel``
(``blocks.N.attn1.to_q``) hold the same matrices under different names — the table is diffusers'
``_convert_non_diffusers_wan_lora_to_diffusers`` (``diffusers/loaders/lora_conversion_utils.py``).
``rename_for(adapter, shapes)`` renames an adapter's targets to the layout of the base it is bound
to; Flux, whose layouts also fuse and split projections, is ``loratools/flux.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from .adapter import Adapter

# (original regex, diffusers template) — blocks first; "{0}" is the block number
WAN = [
    (r"blocks\.(\d+)\.self_attn\.q", "blocks.{0}.attn1.to_q"),
    (r"blocks\.(\d+)\.self_attn\.k", "blocks.{0}.attn1.to_k"),
    (r"blocks\.(\d+)\.self_attn\.v", "blocks.{0}.attn1.to_v"),
    (r"blocks\.(\d+)\.self_attn\.o", "blocks.{0}.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.q", "blocks.{0}.attn2.to_q"),
    (r"blocks\.(\d+)\.cross_attn\.k", "blocks.{0}.attn2.to_k"),
    (r"blocks\.(\d+)\.cross_attn\.v", "blocks.{0}.attn2.to_v"),
    (r"blocks\.(\d+)\.cross_attn\.o", "blocks.{0}.attn2.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.k_img", "blocks.{0}.attn2.add_k_proj"),
    (r"blocks\.(\d+)\.cross_attn\.v_img", "blocks.{0}.attn2.add_v_proj"),
    (r"blocks\.(\d+)\.ffn\.0", "blocks.{0}.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", "blocks.{0}.ffn.net.2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"head\.head", "proj_out"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    (r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
]
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")


def _bare(target: str) -> str:
    t = target.split(":", 1)[-1].removesuffix(".weight")
    for p in _PREFIXES:
        t = t.removeprefix(p)
    return t


def _layout(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """'original' / 'diffusers' for a Wan base, None for anything else."""
    names = list(shapes)
    if any(re.search(r"(^|\.)blocks\.\d+\.self_attn\.q\.weight$", n) for n in names):
        return "original"
    if any(re.search(r"(^|\.)blocks\.\d+\.attn1\.to_q\.weight$", n) for n in names) and any(
            "condition_embedder." in n for n in names):
        return "diffusers"
    return None


def _to_diffusers(t: str) -> str | None:
    for pattern, template in WAN:
        m = re.fullmatch(pattern, t) or re.fullmatch(pattern.replace(r"\.", "_"), t)  # dotted or kohya-flat
        if m:
            return template.format(*m.groups())
    return None


def _to_original(t: str) -> str | None:
    for pattern, template in WAN:
        regex = re.escape(template).replace(r"\{0\}", r"(\d+)")
        m = re.fullmatch(regex, t)
        if m:
            plain = pattern.replace(r"\.", ".").replace(r"(\d+)", "{0}")
            return plain.format(*m.groups())
    return None


def _find(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if name in shapes:
        return name
    hits = [n for n in shapes if n.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def rename_for(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> Adapter:
    """``adapter`` with every Wan module whose name is the other layout's renamed to the base's
    tensor; unchanged when the base is not Wan or nothing needs renaming."""
    layout = _layout(shapes)
    if layout is None:
        return adapter
    modules = {}
    moved = False
    for key, m in adapter.modules.items():
        bare = _bare(m.target)
        other = _to_diffusers(bare) if layout == "diffusers" else _to_original(bare)
        name = _find(other + ".weight", shapes) if other else None
        if name is not None and _find(bare + ".weight", shapes) is None:
            modules[name] = m.with_(target=name)
            moved = True
        else:
            modules[key] = m
    if not moved:
        return adapter
    return replace(adapter, modules=modules, meta={**adapter.meta, "flat_names": False})
