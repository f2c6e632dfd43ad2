"""Flux.1 and SD3 names: each model's original layout and diffusers', and LoRA modules carried
between them.

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

The name tables below are diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers`` (``diffusers/loaders/single_file_utils.py``),
row sizes taken from the base's own shapes (never 3072 hard-coded). kohya's flattened names
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_joint_blocks_0_x_block_attn_qkv``) are the
original names with ``.`` → ``_``. SD3 (MMDiT, and SD3.5's MMDiT-X ``attn2``): ``joint_blocks.N.
{x,context}_block.attn.qkv`` fused, the last block's ``context_block.adaLN_modulation.1`` and
``final_layer.adaLN_modulation.1`` with (shift, scale) swapped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .adapter import Adapter, LoraModule
from .deltas import Delta, LowRank, RowSlice, RowStack
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
# SD3 / SD3.5 (MMDiT, MMDiT-X): diffusers' convert_sd3_transformer_checkpoint_to_diffusers
SD3_JOINT = {
    "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "x_block.attn.proj": ["attn.to_out.0"],
    "context_block.attn.proj": ["attn.to_add_out"],
    "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
    "x_block.attn2.proj": ["attn2.to_out.0"],
    "x_block.mlp.fc1": ["ff.net.0.proj"],
    "x_block.mlp.fc2": ["ff.net.2"],
    "context_block.mlp.fc1": ["ff_context.net.0.proj"],
    "context_block.mlp.fc2": ["ff_context.net.2"],
    "x_block.adaLN_modulation.1": ["norm1.linear"],
    "context_block.adaLN_modulation.1": ["norm1_context.linear"],  # (shift, scale) swapped in the last block only
}
SD3_GLOBAL = {
    "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


@dataclass(frozen=True)
class Family:
    """One model's two layouts: its block kinds (original prefix, diffusers prefix, part table),
    renamed globals, and how to recognise each layout."""

    name: str
    original: re.Pattern[str]
    diffusers: re.Pattern[str]
    blocks: tuple[tuple[str, str, dict[str, list[str]]], ...]
    globals: dict[str, str]

    def swapped(self, orig: str, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Modules whose (shift, scale) halves the two layouts store the other way round."""
        if orig == "final_layer.adaLN_modulation.1":
            return True
        m = re.match(r"^joint_blocks\.(\d+)\.context_block\.adaLN_modulation\.1$", orig)
        if m and self.name == "sd3":
            last = max(int(x.group(1)) for n in shapes if (x := re.search(r"transformer_blocks\.(\d+)\.", n)))
            return int(m[1]) == last
        return False


FAMILIES = (
    Family("flux", re.compile(r"(^|\.)double_blocks\.\d+\.img_attn\.qkv\.weight$"),
           re.compile(r"(^|\.)single_transformer_blocks\.\d+\.attn\.to_q\.weight$"),
           (("double_blocks", "transformer_blocks", DOUBLE), ("single_blocks", "single_transformer_blocks", SINGLE)),
           GLOBAL),
    Family("sd3", re.compile(r"(^|\.)joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$"),
           re.compile(r"(^|\.)transformer_blocks\.\d+\.attn\.add_q_proj\.weight$"),
           (("joint_blocks", "transformer_blocks", SD3_JOINT),), SD3_GLOBAL),
)


def _family(shapes: Mapping[str, tuple[int, ...]]) -> tuple[Family, str] | None:
    """(family, "bfl" for its original layout or "diffusers") of a base, or None."""
    names = list(shapes)
    for fam in FAMILIES:
        if any(fam.original.search(n) for n in names):
            return fam, "bfl"
    flux_split = any(FAMILIES[0].diffusers.search(n) for n in names)
    sd3_split = any(FAMILIES[1].diffusers.search(n) for n in names) and not flux_split
    if flux_split:
        return FAMILIES[0], "diffusers"
    if sd3_split and any("pos_embed.proj" in n for n in names):
        return FAMILIES[1], "diffusers"
    return None


def _bfl_name(fam: Family, target: str) -> str | None:
    """The original module path a target names (kohya flattened, ComfyUI/BFL dotted), else None."""
    t = target.split(":", 1)[-1].removesuffix(".weight")
    for prefix in ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet."):
        t = t.removeprefix(prefix)
    for orig, _, table in fam.blocks:
        m = re.match(rf"^{orig}_(\d+)_(.+)$", t)  # kohya: double_blocks_0_img_attn_qkv
        if m:
            rest = next((k for k in table if k.replace(".", "_") == m[2]), None)
            return f"{orig}.{m[1]}.{rest}" if rest else None
        m = re.match(rf"^{orig}\.(\d+)\.(.+)$", t)
        if m:
            return t if m[2] in table else None
    flat_globals = {k.replace(".", "_"): k for k in fam.globals}
    if t in flat_globals:
        return flat_globals[t]
    return t if t in fam.globals and fam.globals[t] != t else None


def _diffusers_name(fam: Family, target: str) -> tuple[str, str, int] | None:
    """(original module, diffusers module, its index among the original's parts) for a diffusers target."""
    t = target.split(":", 1)[-1].removesuffix(".weight").removeprefix("transformer.")
    for orig, dif, table in fam.blocks:
        m = re.match(rf"^{dif}\.(\d+)\.(.+)$", t)
        flat = re.match(rf"^{dif}_(\d+)_(.+)$", t)  # kohya-flattened diffusers names (OneTrainer, SimpleTuner)
        for match, same in ((m, lambda a, b: a == b), (flat, lambda a, b: a.replace(".", "_") == b)):
            if match:
                for key, parts in table.items():
                    hit = next((p for p in parts if same(p, match[2])), None)
                    if hit is not None:
                        name = f"{dif}.{match[1]}.{hit}"
                        return f"{orig}.{match[1]}.{key}", name, parts.index(hit)
                return None
    for key, name in fam.globals.items():
        if key != name and t in (name, name.replace(".", "_")):
            return key, name, 0
    return None


def _find(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if name in shapes:
        return name
    hits = [n for n in shapes if n.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def _rows(m: LoraModule, i: int, j: int, target: str) -> LoraModule:
    """Rows i:j of a module: a plain LoRA's B cut (A shared), any other kind as a RowSlice; its bias
    change cut alike."""
    d = m.delta
    delta = replace(d, B=d.B[i:j].contiguous()) if isinstance(d, LowRank) else RowSlice(d, i, j)
    bias = None if m.bias is None else m.bias[i:j].contiguous()
    return m.with_(target=target, delta=delta, bias=bias, bias_target=None, shape=None, transposed=False, kernel=(),
                   kind="linear")


def _swap_halves(m: LoraModule) -> LoraModule:
    """The module with its two halves of rows exchanged ((shift, scale) ↔ (scale, shift))."""
    d = m.delta
    n = d.out_features
    half = n // 2
    if isinstance(d, LowRank):
        delta: Delta = replace(d, B=torch.cat([d.B[half:], d.B[:half]]).contiguous())
    else:
        delta = RowStack(((0, RowSlice(d, half, n)), (n - half, RowSlice(d, 0, half))), n)
    bias = None if m.bias is None else torch.cat([m.bias[half:], m.bias[:half]]).contiguous()
    return m.with_(delta=delta, bias=bias)


def bind_flux(adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> Adapter:
    """``adapter`` with its Flux modules renamed (and cut or stacked) for the layout of ``shapes``;
    unchanged when the base is not Flux or every name is already the base's."""
    found = _family(shapes)
    if found is None:
        return adapter
    fam, layout = found
    warnings: list[str] = []
    modules: dict[str, LoraModule] = {}
    moved = False
    groups: dict[str, list[tuple[int, LoraModule]]] = {}
    for key, m in adapter.modules.items():
        bfl = _bfl_name(fam, m.target)
        dif = _diffusers_name(fam, m.target)
        if layout == "diffusers" and bfl is not None:
            if m.magnitude is not None or not getattr(m.delta, "additive", True):
                raise UnsupportedAdapterError(f"{adapter.path}: module {clip(m.target)} ({m.delta.kind}"
                                              f"{', DoRA' if m.magnitude is not None else ''}) cannot be split onto "
                                              "diffusers' separate projections: its change is not row by row.",
                                              tensor=m.target)
            parts = _parts_bfl_to_diffusers(fam, bfl, shapes)
            if parts is None:
                modules[key] = m
                continue
            if fam.swapped(bfl, shapes):
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
        modules[name], note = _stack(fam, adapter, bfl, name, members, shapes)
        if note:
            warnings.append(note)
    if not moved:
        return adapter
    if adapter.meta.get("flat_names"):  # kohya: what stays flat is another component's (a text encoder)
        others = [k for k, m in modules.items() if ":" in m.target and not m.target.startswith(("unet:", "transformer:"))]
        if others:
            components = sorted({modules[k].target.split(":", 1)[0] for k in others})
            warnings.append(f"left out {len(others)} module(s) of {', '.join(components)}: this base is one "
                            f"{fam.name} transformer")
            modules = {k: m for k, m in modules.items() if k not in others}
    meta = {**adapter.meta, "flat_names": False}
    return replace(adapter, modules=modules, meta=meta, warnings=list(adapter.warnings) + warnings)


def _table(fam: Family, orig: str) -> tuple[str, list[str]]:
    """(diffusers block prefix with its number, the parts) of an original module, or ("", [global])."""
    for o, dif, table in fam.blocks:
        m = re.match(rf"^{o}\.(\d+)\.(.+)$", orig)
        if m:
            return f"{dif}.{m[1]}.", table[m[2]]
    return "", [fam.globals[orig]]


def _parts_bfl_to_diffusers(fam: Family, bfl: str, shapes: Mapping[str, tuple[int, ...]]) -> list[
        tuple[str, int, int]] | None:
    """The diffusers tensors an original module spans, with its row range in each, from the base's shapes."""
    block, parts = _table(fam, bfl)
    names = [block + p for p in parts]
    found = [_find(n + ".weight", shapes) for n in names]
    if any(f is None for f in found):
        return None
    parts, lo = [], 0
    for f in found:
        hi = lo + int(shapes[f][0])  # type: ignore[index]
        parts.append((f, lo, hi))
        lo = hi
    return parts  # type: ignore[return-value]


def _stack(fam: Family, adapter: Adapter, bfl: str, name: str, members: list[tuple[int, LoraModule]],
           shapes: Mapping[str, tuple[int, ...]]) -> tuple[LoraModule, str | None]:
    """One module on the fused tensor ``name`` from modules on its parts: A stacked, B block-diagonal."""
    m0 = members[0][1]
    bad = [m for _, m in members if m.magnitude is not None or not getattr(m.delta, "additive", True)]
    if bad:
        raise UnsupportedAdapterError(f"{adapter.path}: module {clip(bad[0].target)} ({bad[0].delta.kind}) cannot be "
                                      f"joined into the fused {clip(bfl)}: its change is not row by row.",
                                      tensor=bad[0].target)
    count = len(_table(fam, bfl)[1])
    rows_total = int(shapes[name][0])
    sizes = _part_sizes(count, rows_total, members)
    offsets = [sum(sizes[:k]) for k in range(count)]
    bias = None
    if any(m.bias is not None for _, m in members):  # bias changes, added as they are
        bias = torch.zeros(rows_total, dtype=torch.float64)
        for index, m in members:
            if m.bias is not None:
                bias[offsets[index]:offsets[index] + sizes[index]] = m.bias.double() * m.bias_factor
        bias = bias.to(next(m.bias.dtype for _, m in members if m.bias is not None))
    if not all(isinstance(m.delta, LowRank) for _, m in members):  # LoHa, LoKr, full: stacked as they are
        parts = tuple((offsets[index], m.delta) for index, m in sorted(members, key=lambda x: x[0]))
        stacked: Delta = RowStack(parts, rows_total)
        joined = LoraModule(target=name, delta=stacked, kind="linear", transposed=False, bias=bias,
                            bias_scale=None if bias is None else 1.0,
                            source_keys=tuple(k for _, m in members for k in m.source_keys))
        return (_swap_halves(joined) if fam.swapped(bfl, shapes) else joined), None
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
    if fam.swapped(bfl, shapes):
        half = B.shape[0] // 2
        B = torch.cat([B[half:], B[:half]])
    delta = LowRank(A.contiguous(), B.contiguous(), scale, None)
    if bias is not None and fam.swapped(bfl, shapes):
        bias = torch.cat([bias[rows_total // 2:], bias[:rows_total // 2]])
    joined = LoraModule(target=name, delta=delta, kind="linear", transposed=False, bias=bias,
                        bias_scale=None if bias is None else 1.0,
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
