"""Flux.1 names: BFL's original layout and diffusers', and LoRA modules carried between them.

BFL's checkpoints (``flux1-dev.safetensors``, what ComfyUI, Forge and sd-scripts use) fuse q, k
and v into one ``qkv`` projection per stream and, in single blocks, q, k, v and the MLP input into
``linear1``; diffusers' ``FluxTransformer2DModel`` keeps them apart. A LoRA made for one layout is
carried to the other exactly (``bind_flux``):

* a module on a fused tensor applied to split ones: B cut by rows, A shared (the same product);
* modules on split tensors applied to a fused one: one module whose A stacks theirs and whose B
  is block-diagonal (zeros elsewhere) — the sum of their products, exact when they share a scale
  (else each scale is folded into its B: one rounding, said in a warning);
* ``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear``: BFL stores (shift, scale), diffusers
  (scale, shift): B's two halves swap.

The name table below is diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``), row sizes taken from the base's own shapes (never
3072 hard-coded). kohya's flattened names (``lora_unet_double_blocks_0_img_attn_qkv``) are the BFL
names with ``.`` → ``_``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

import torch

from .adapter import Adapter, LoraModule
from .deltas import LowRank
from .errors import UnsupportedAdapterError
from .jsonio import clip

# BFL module → diffusers module(s), in row order ("{i}": the block number)
DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
GLOBAL = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) ↔ (scale, shift)
}
SWAPPED = {"final_layer.adaLN_modulation.1"}

_FLAT = re.compile(r"^(double_blocks|single_blocks)_(\d+)_(.+)$")


def _layout(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    names = list(shapes)
    if any(".img_attn.qkv.weight" in n or n.startswith("double_blocks.") for n in names):
        return "bfl"
    if any("single_transformer_blocks." in n for n in names) and any("transformer_blocks." in n for n in names):
        return "diffusers"
    return None


def _bfl_name(target: str) -> str | None:
    """The BFL module path a target names (kohya flattened, ComfyUI/BFL dotted), else None."""
    t = target.split(":", 1)[-1].removesuffix(".weight")
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet."):
        t = t.removeprefix(prefix)
    m = _FLAT.match(t)
    if m:  # kohya: double_blocks_0_img_attn_qkv → double_blocks.0.img_attn.qkv
        table = DOUBLE if m[1] == "double_blocks" else SINGLE
        rest = next((k for k in table if k.replace(".", "_") == m[3]), None)
        return f"{m[1]}.{m[2]}.{rest}" if rest else None
    flat_globals = {k.replace(".", "_"): k for k in GLOBAL}
    if t in flat_globals:
        return flat_globals[t]
    m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", t)
    if m and m[3] in (DOUBLE if m[1] == "double_blocks" else SINGLE):
        return t
    return t if t in GLOBAL else None


def _diffusers_name(target: str) -> tuple[str, str, int] | None:
    """(BFL module, diffusers module, its index among the BFL module's parts) for a diffusers target."""
    t = target.split(":", 1)[-1].removesuffix(".weight").removeprefix("transformer.")
    m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$", t)
    if m:
        table = DOUBLE if m[1] == "transformer_blocks" else SINGLE
        bfl = "double_blocks" if m[1] == "transformer_blocks" else "single_blocks"
        for key, parts in table.items():
            if m[3] in parts:
                return f"{bfl}.{m[2]}.{key}", t, parts.index(m[3])
        return None
    for key, name in GLOBAL.items():
        if t == name:
            return key, t, 0
    return None


def _find(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if name in shapes:
        return name
    hits = [n for n in shapes if n.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def _rows(m: LoraModule, i: int, j: int, target: str) -> LoraModule:
    d = m.delta
    assert isinstance(d, LowRank)
    return m.with_(target=target, delta=replace(d, B=d.B[i:j].contiguous()), shape=None, transposed=False)


def _swap_halves(m: LoraModule) -> LoraModule:
    d = m.delta
    assert isinstance(d, LowRank)
    half = d.B.shape[0] // 2
    return m.with_(delta=replace(d, B=torch.cat([d.B[half:], d.B[:half]]).contiguous()))


def bind_flux(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> Adapter:
    """``adapter`` with its Flux modules renamed (and cut or stacked) for the layout of ``shapes``;
    unchanged when the base is not Flux or every name is already the base's."""
    layout = _layout(shapes)
    if layout is None:
        return adapter
    warnings: list[str] = []
    modules: dict[str, LoraModule] = {}
    moved = False
    groups: dict[str, list[tuple[int, LoraModule]]] = {}
    for key, m in adapter.modules.items():
        bfl = _bfl_name(m.target)
        dif = _diffusers_name(m.target)
        if layout == "diffusers" and bfl is not None:
            if not isinstance(m.delta, LowRank) or m.magnitude is not None or m.bias is not None:
                raise UnsupportedAdapterError(f"{adapter.path}: module {clip(m.target)} ({m.delta.kind}"
                                              f"{', DoRA' if m.magnitude is not None else ''}) cannot be split onto "
                                              "diffusers' separate projections yet.", tensor=m.target)
            parts = _parts_bfl_to_diffusers(bfl, shapes)
            if parts is None:
                modules[key] = m
                continue
            if bfl in SWAPPED:
                m = _swap_halves(m)
            rows = sum(hi - lo for _, lo, hi in parts)
            if rows != m.delta.out_features:
                raise UnsupportedAdapterError(
                    f"{adapter.path}: module {clip(m.target)} has {m.delta.out_features} outputs; the base's "
                    f"{', '.join(n for n, _, _ in parts)} have {rows} together.", tensor=m.target)
            for name, lo, hi in parts:
                modules[name] = _rows(m, lo, hi, name)
            moved = True
        elif layout == "bfl" and dif is not None and _find(dif[1] + ".weight", shapes) is None:
            groups.setdefault(dif[0], []).append((dif[2], m))
            moved = True
        else:
            modules[key] = m
    for bfl, members in groups.items():
        name = _find(bfl + ".weight", shapes)
        if name is None:
            for _, m in members:
                modules[m.target] = m  # reported as unbound by the binder
            continue
        modules[name], note = _stack(adapter, bfl, name, members, shapes)
        if note:
            warnings.append(note)
    if not moved:
        return adapter
    if adapter.meta.get("flat_names"):  # kohya: what stays flat is another component's (a text encoder)
        others = [k for k, m in modules.items() if ":" in m.target and not m.target.startswith(("unet:", "transformer:"))]
        if others:
            components = sorted({modules[k].target.split(":", 1)[0] for k in others})
            warnings.append(f"left out {len(others)} module(s) of {', '.join(components)}: this base is one Flux "
                            "transformer")
            modules = {k: m for k, m in modules.items() if k not in others}
    meta = {**adapter.meta, "flat_names": False}
    return replace(adapter, modules=modules, meta=meta, warnings=list(adapter.warnings) + warnings)


def _parts_bfl_to_diffusers(bfl: str, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, int, int]] | None:
    """The diffusers tensors a BFL module spans, with its row range in each, from the base's shapes."""
    m = re.match(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$", bfl)
    if m:
        block = ("transformer_blocks." if m[1] == "double_blocks" else "single_transformer_blocks.") + m[2] + "."
        names = [block + p for p in (DOUBLE if m[1] == "double_blocks" else SINGLE)[m[3]]]
    else:
        names = [GLOBAL[bfl]]
    found = [_find(n + ".weight", shapes) for n in names]
    if any(f is None for f in found):
        return None
    parts, lo = [], 0
    for f in found:
        hi = lo + int(shapes[f][0])  # type: ignore[index]
        parts.append((f, lo, hi))
        lo = hi
    return parts  # type: ignore[return-value]


def _stack(adapter: Adapter, bfl: str, name: str, members: list[tuple[int, LoraModule]],
           shapes: Mapping[str, tuple[int, ...]]) -> tuple[LoraModule, str | None]:
    """One module on the fused tensor ``name`` from modules on its parts: A stacked, B block-diagonal."""
    m0 = members[0][1]
    bad = [m for _, m in members if not isinstance(m.delta, LowRank) or m.magnitude is not None or m.bias is not None]
    if bad:
        raise UnsupportedAdapterError(f"{adapter.path}: module {clip(bad[0].target)} ({bad[0].delta.kind}) cannot be "
                                      f"joined into BFL's fused {clip(bfl)} yet.", tensor=bad[0].target)
    table = DOUBLE if bfl.startswith("double_blocks.") else SINGLE if bfl.startswith("single_blocks.") else None
    key = bfl.split(".", 2)[2] if table is not None else bfl
    count = len(table[key]) if table is not None else 1
    rows_total = int(shapes[name][0])
    sizes = _part_sizes(count, rows_total, members)
    offsets = [sum(sizes[:k]) for k in range(count)]
    scales = {float(m.delta.scale) for _, m in members}
    scale = float(next(iter(scales)))
    note = None
    if len(scales) > 1:
        scale = 1.0
        note = (f"{bfl}: its parts have different scales; each was folded into its B (one rounding) to join them "
                "into the fused tensor")
    As, Bs = [], []
    dtype = m0.delta.B.dtype
    for index, m in sorted(members, key=lambda x: x[0]):
        d = m.delta.with_scale(scale) if len(scales) > 1 else m.delta
        B = torch.zeros(rows_total, d.rank, dtype=dtype)
        B[offsets[index]:offsets[index] + sizes[index]] = d.B.to(dtype)
        As.append(d.A.to(dtype))
        Bs.append(B)
    A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    if bfl in SWAPPED:
        half = B.shape[0] // 2
        B = torch.cat([B[half:], B[:half]])
    delta = LowRank(A.contiguous(), B.contiguous(), scale, None)
    joined = LoraModule(target=name, delta=delta, kind="linear", transposed=False,
                        source_keys=tuple(k for _, m in members for k in m.source_keys))
    return joined, note


def _part_sizes(count: int, rows_total: int, members: list[tuple[int, LoraModule]]) -> list[int]:
    """Rows of each part of a fused tensor: known from the members' own B, the rest shared equally
    among q/k/v (the MLP part of linear1 takes what is left)."""
    known = {index: int(m.delta.out_features) for index, m in members}
    if count == 1:
        return [rows_total]
    if count == 3 or (count == 4 and 3 not in known):
        h = next((v for i, v in known.items() if i < 3), None)
        if h is None:
            raise UnsupportedAdapterError("cannot tell the q/k/v sizes of a fused Flux tensor from an MLP-only module")
        sizes = [h, h, h] + ([rows_total - 3 * h] if count == 4 else [])
    else:
        h = (rows_total - known[3]) // 3
        sizes = [h, h, h, known[3]]
    return sizes
