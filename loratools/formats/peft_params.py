"""PEFT LoRA on parameters (``target_parameters``): fused mixture-of-experts weights.

PEFT 0.21's ``lora.ParamWrapper`` (``peft/tuners/lora/layer.py``) adapts a 3-D parameter
(E, d1, d2) — transformers 5 keeps Qwen2/Qwen3-MoE experts fused this way in memory,
``mlp.experts.gate_up_proj`` (E, 2·I, H) and ``mlp.experts.down_proj`` (E, H, I) — with one
``lora_A`` (r·E, in) and one ``lora_B`` (out, r·E): expert e's factors are rows e·r … of A
(``A.reshape(E, r, in)[e]``) and every E-th column of B (``B.reshape(out, r, E)[:, :, e]``), and
ΔW_e = scale · B_e @ A_e. For a parameter of a module without ``is_transposed`` PEFT swaps in and
out (in = d2, out = d1). Several parameters of one module are wrappers nested inside each other:
``…experts.base_layer.lora_A.weight`` is the inner one; which parameter each level adapts is read
from its shapes against the base's config (hidden_size H, moe_intermediate_size I) — refused when
they cannot tell.

On disk transformers 5 writes these experts per expert, the way older checkpoints are:
``mlp.experts.{e}.gate_proj.weight`` / ``up_proj`` (I, H) — the two halves of gate_up_proj[e] —
and ``down_proj`` (H, I); Mixtral (fused the same way in memory, I = intermediate_size) as
``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down). Each expert's ΔW is bound there: gate_up's B cut by rows (A shared),
exact. Checkpoints that store the experts fused on disk (gpt-oss) are not bound yet (refused as
unbound); other MoE configs are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, LoraModule, lowrank_module
from ..checkpoint.reader import load_state_dict
from ..checkpoint.safetensors_io import load_tensors, read_header
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..jsonio import clip
from .common import check_factor

PREFIX = "base_model.model."
KEY = re.compile(r"^base_model\.model\.(?P<module>.+?)\.(?P<depth>(?:base_layer\.)*)lora_(?P<role>[AB])\.weight$")


MIXTRAL = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # its legacy per-expert names


def _on_disk(module: str, expert: int, part: str, mixtral: bool) -> str:
    """Where one expert's part lives on disk: ``…mlp.experts.{e}.gate_proj.weight`` (Qwen-MoE), or
    Mixtral's ``…block_sparse_moe.experts.{e}.w1.weight`` (w1 gate, w3 up, w2 down)."""
    if mixtral and module.endswith(".mlp.experts"):
        return f"{module.removesuffix('.mlp.experts')}.block_sparse_moe.experts.{expert}.{MIXTRAL[part]}.weight"
    return f"{module}.{expert}.{part}.weight"


def _levels(weights: Path, r: int, keys: set[str] | None = None) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module, lora_A (r·E, in), lora_B (out, r·E)) of every wrapper level, checked."""
    sd = load_tensors([t for k, t in read_header(weights).tensors.items() if keys is None or k in keys]) \
        if weights.suffix == ".safetensors" else {k: v for k, v in load_state_dict(weights).items()
                                                  if keys is None or k in keys}
    levels: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = KEY.match(key)
        if m is None:
            raise AdapterFormatError(f"{weights}: {clip(key)} is not a lora_A / lora_B of a parameter wrapper.",
                                     path=weights, tensor=key)
        levels.setdefault((m["module"], m["depth"].count("base_layer.")), {})[m["role"]] = check_factor(t, key, weights)
    out = []
    for (module, depth), f in sorted(levels.items()):
        if set(f) != {"A", "B"}:
            raise AdapterFormatError(f"{weights}: {clip(module)} (level {depth}) lacks lora_A or lora_B.", path=weights)
        A, B = f["A"], f["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] % r:
            raise AdapterFormatError(f"{weights}: {clip(module)} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}: "
                                     f"not (r·E, in) and (out, r·E) with r = {r}.", path=weights, tensor=module)
        out.append((module, A, B))
    return out


# architectures whose checkpoints keep the experts fused on disk, as (E, d1, d2) tensors:
# model_type → {parameter: (d1, d2) as config keys}
FUSED_ON_DISK = {
    "gpt_oss": {"gate_up_proj": ("hidden_size", "2*intermediate_size"), "down_proj": ("intermediate_size", "hidden_size")},
    # Llama 4 (text): the same (E, H, 2I) / (E, I, H) fused parameters, read by PEFT the swapped way
    "llama4_text": {"gate_up_proj": ("hidden_size", "2*intermediate_size"),
                    "down_proj": ("intermediate_size", "hidden_size")},
}


def _dims(bc: dict, spec: str) -> int | None:
    times, _, key = spec.rpartition("*")
    v = bc.get(key)
    return int(times or 1) * v if isinstance(v, int) and v > 0 else None


def _read_fused(path: Path, cfg: dict[str, Any], config_path: Path, weights: Path, bc: dict,
                params: list[str], keys: set[str] | None = None) -> Adapter:
    """Experts fused on disk (gpt-oss): one :class:`Experts` delta per parameter, bound to the
    (E, d1, d2) tensor itself. PEFT's two layouts are told apart by the factors' shapes: lora_A
    (r·E, d1) with lora_B (d2, r·E) is the parameter read as (in, out) — PEFT's ``is_transposed``
    experts, x @ W[e] — so the stored ΔW_e is (B_e A_e)ᵀ; lora_A (r·E, d2) with lora_B (d1, r·E) is
    PEFT's swapped reading, stored as B_e A_e. Where d1 = d2 nothing tells them apart: refused."""
    from ..deltas import Experts

    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", 8)
    scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    shapes = {}
    for name, (k1, k2) in FUSED_ON_DISK[bc["model_type"]].items():
        d1, d2 = _dims(bc, k1), _dims(bc, k2)
        if d1 is None or d2 is None:
            raise UnsupportedAdapterError(f"{config_path}: the base config lacks {k1} / {k2} for {name}.",
                                          path=config_path, hint="Pass --base BASE (the model the adapter was made for).")
        shapes[name] = (d1, d2)
    modules: dict[str, LoraModule] = {}
    for module, A, B in _levels(weights, r, keys):
        experts = A.shape[0] // r
        fin, fout = int(A.shape[1]), int(B.shape[0])
        found = [(name, fin == d1) for name, (d1, d2) in shapes.items() if {fin, fout} == {d1, d2}
                 and any((module + "." + name).endswith(p) for p in params)]
        if len(found) != 1:
            raise UnsupportedAdapterError(
                f"{weights}: {clip(module)} has factors (in {fin}, out {fout}) that match "
                f"{'none' if not found else 'more than one'} of the expert parameters "
                f"{', '.join(f'{n} {list(d)}' for n, d in shapes.items())} among target_parameters {params}.",
                path=weights, tensor=module)
        name, transposed = found[0]
        d1, d2 = shapes[name]
        if d1 == d2:
            raise UnsupportedAdapterError(f"{weights}: {clip(module)}.{name} is square per expert ({d1}×{d2}): the "
                                          "factors' shapes cannot tell PEFT's two layouts apart and nothing declares "
                                          "which was used.", path=weights, tensor=module)
        target = f"{module}.{name}"
        delta = Experts(A.reshape(experts, r, fin).contiguous(), B.reshape(fout, r, experts).permute(2, 0, 1).contiguous(),
                        scale, transposed=transposed, alpha=float(alpha))
        modules[target] = LoraModule(target, delta, kind="experts", transposed=False, source_keys=(module,))
    if not modules:
        raise AdapterFormatError(f"{weights} holds no parameter LoRA.", path=weights)
    return Adapter(modules=modules, meta={"format": "peft", "config": cfg, "base_model": cfg.get(
        "base_model_name_or_path"), "target_parameters": list(params)}, path=path, files=[config_path, weights])


def read(path: Path, cfg: dict[str, Any], config_path: Path, weights: Path, base_config: dict | None, *,
         keys: set[str] | None = None) -> Adapter:
    """``keys``: only these tensors of the file (the parameter wrappers of an adapter that also has
    module LoRA)."""
    params = cfg.get("target_parameters") or []
    if cfg.get("target_modules") or cfg.get("modules_to_save") or cfg.get("rank_pattern") or cfg.get("alpha_pattern") \
            or cfg.get("use_dora") or cfg.get("lora_bias"):
        raise UnsupportedAdapterError(f"{config_path}: target_parameters beside target_modules, modules_to_save, "
                                      "rank/alpha patterns, DoRA or lora_bias is not read yet.", path=config_path)
    bc = base_config or {}
    if bc.get("model_type") in FUSED_ON_DISK:
        return _read_fused(path, cfg, config_path, weights, bc, params, keys)
    mixtral = bc.get("model_type") == "mixtral"
    H, I = bc.get("hidden_size"), bc.get("intermediate_size" if mixtral else "moe_intermediate_size")
    if not (isinstance(H, int) and isinstance(I, int) and H > 0 and I > 0):
        raise UnsupportedAdapterError(
            f"{config_path}: LoRA on fused MoE expert parameters needs the base's hidden_size and "
            f"{'intermediate_size' if mixtral else 'moe_intermediate_size'} (model_type "
            f"{clip(repr(bc.get('model_type')))}; Qwen2/Qwen3-MoE, Mixtral and gpt-oss are mapped), which "
            f"{'its config lacks' if bc else 'needs the base'}.", path=config_path,
            hint="Pass --base BASE (the model the adapter was made for).")
    if H == 2 * I:
        raise UnsupportedAdapterError(f"{config_path}: hidden_size = 2·moe_intermediate_size: the shapes cannot tell "
                                      "gate_up_proj's factors from down_proj's.", path=config_path)
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", 8)
    scale = float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    modules: dict[str, LoraModule] = {}
    for module, A, B in _levels(weights, r, keys):
        experts = A.shape[0] // r
        which = {(H, 2 * I): "gate_up_proj", (I, H): "down_proj"}.get((int(A.shape[1]), int(B.shape[0])))
        if which is None or not any((module + "." + which).endswith(p) for p in params):
            raise UnsupportedAdapterError(
                f"{weights}: {clip(module)} has factors for a parameter of (in {A.shape[1]}, out {B.shape[0]}); "
                f"expected gate_up_proj (in {H}, out {2 * I}) or down_proj (in {I}, out {H}) among "
                f"target_parameters {params}.", path=weights, tensor=module)
        As = A.reshape(experts, r, A.shape[1])
        Bs = B.reshape(B.shape[0], r, experts)
        for e in range(experts):
            a, b = As[e].contiguous(), Bs[:, :, e].contiguous()
            pieces = ([("gate_proj", b[:I]), ("up_proj", b[I:])] if which == "gate_up_proj" else [("down_proj", b)])
            for name, part in pieces:
                target = _on_disk(module, e, name, mixtral)
                modules[target] = lowrank_module(target, a, part.contiguous(), scale, float(alpha), kind="linear",
                                                 transposed=False, source_keys=(module,))
    if not modules:
        raise AdapterFormatError(f"{weights} holds no parameter LoRA.", path=weights)
    return Adapter(modules=modules, meta={"format": "peft", "config": cfg, "base_model": cfg.get(
        "base_model_name_or_path"), "target_parameters": list(params)}, path=path, files=[config_path, weights])
