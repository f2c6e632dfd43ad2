"""Helpers the format modules share: grouping a file's keys by suffix (every reader consumes every
key or names the leftovers), how per-module scales are expressed in formats that have one global
scale, PEFT-style rank/alpha patterns, and the component prefixes of diffusers pipelines."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import torch

from ..adapter import LoraModule, check_finite
from ..checkpoint.safetensors_io import Header, load_tensors
from ..deltas import LowRank
from ..errors import AdapterFormatError, InternalError, NonFiniteError, UnsupportedAdapterError
from ..jsonio import clip

# components of a diffusers pipeline, as target-name prefixes, and the kohya prefix of each
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")


def component_of(target: str) -> tuple[str | None, str]:
    """('unet', 'down_blocks.0…') for 'unet.down_blocks.0…'; (None, target) without a component."""
    head, _, rest = target.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, target


def default_component(base_config: dict | None) -> str:
    """The pipeline component a checkpoint without component prefixes is: a CLIP text model is a
    text encoder, a diffusers transformer (its config's ``_class_name``) the transformer; anything
    else (a UNet, or a model outside a pipeline) goes where the UNet does."""
    cfg = base_config or {}
    archs = cfg.get("architectures")
    archs = " ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ""
    if cfg.get("model_type") in ("clip_text_model", "clip") or "CLIPText" in archs:
        return "text_encoder"
    cls = cfg.get("_class_name")
    if isinstance(cls, str) and "Transformer" in cls:  # FluxTransformer2DModel, SD3…, WanTransformer3DModel…
        return "transformer"  # diffusion-transformer pipelines load `transformer.` keys, never `unet.`
    return "unet"


def check_factor(t: torch.Tensor, key: str, path: Path, *, integer_ok: bool = False) -> torch.Tensor:
    """A tensor of an adapter's math (factor, alpha, magnitude, bias) must hold real numbers —
    floating point (an integer ``alpha`` too with ``integer_ok``) — that are finite."""
    if t.is_complex() or t.dtype == torch.bool or not (t.is_floating_point() or integer_ok):
        raise UnsupportedAdapterError(
            f"{path}: tensor {clip(key)} is {str(t.dtype).removeprefix('torch.')}; LoRA tensors hold floating-point "
            "numbers.", path=path, tensor=key,
            hint="A quantized or otherwise encoded adapter must be dequantized by the tool that made it.")
    check_finite(t, what=f"{path}: adapter tensor {clip(key)}", path=path)
    return t


def check_rank(path: Path, module: str, down: tuple[int, ...], up: tuple[int, ...], *, rank_axis: int = 0,
               what: str = "factors") -> int:
    """The rank of a factor pair whose ``down`` factor holds it on ``rank_axis``: both factors at
    least matrices, no dimension 0 (a rank-0 pair is nothing, and an empty factor of a huge claimed
    shape must not become a huge ΔW)."""
    if len(down) < 2 or len(up) < 2:
        raise AdapterFormatError(f"{path}: {clip(module)} has {what} of shapes {tuple(down)} and {tuple(up)}; LoRA "
                                 "factors are matrices.", path=path, tensor=module)
    if 0 in down or 0 in up:
        raise AdapterFormatError(f"{path}: {clip(module)} has {what} of shapes {tuple(down)} and {tuple(up)}: a "
                                 "dimension of 0 (a LoRA of rank 0 changes nothing).", path=path, tensor=module)
    return int(down[rank_axis])


def check_scale(path: Path, module: str, scale: float, *, what: str = "scale") -> float:
    """A module's alpha or scale must be a finite number (an inf alpha makes ΔW all inf / NaN)."""
    if not math.isfinite(scale):
        raise NonFiniteError(f"{path}: {clip(module)} has {what} {scale}; it must be finite.", path=path,
                             tensor=module, hint="The adapter is damaged; re-download or re-train it.")
    return scale


def load_groups(header: Header, named: dict[str, dict[str, str]], path: Path, *,
                integer_roles: frozenset[str] = frozenset({"alpha"})) -> dict[
        str, dict[str, tuple[str, torch.Tensor]]]:
    """The tensors of grouped keys (``keys.group_keys``), loaded and checked (real, finite):
    ``{stem: {role: (key, tensor)}}``."""
    loaded = load_tensors([header.tensors[key] for roles in named.values() for key in roles.values()])
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for stem, roles in named.items():
        for role, key in roles.items():
            t = check_factor(loaded[key], key, path, integer_ok=role in integer_roles)
            groups.setdefault(stem, {})[role] = (key, t)
    return groups


def scalar(t: torch.Tensor, key: str, path: Path) -> float:
    """The one value of a scalar tensor (kohya / diffusers ``alpha``): shape () or (1,)."""
    if t.numel() != 1:
        raise AdapterFormatError(f"{path}: {clip(key)} has shape {tuple(t.shape)}; an alpha is one number.",
                                 path=path, tensor=key)
    return float(t.reshape(-1)[0])


def with_record(metadata: dict[str, str], record: str | None) -> dict[str, str]:
    """A written adapter's safetensors metadata with loratools' record (what made it) beside it."""
    return {**metadata, "loratools": record} if record is not None else metadata


def lowrank(m: LoraModule) -> LowRank:
    """The module's low-rank delta (writers are only called with kinds their format declared)."""
    if not isinstance(m.delta, LowRank):
        raise InternalError(f"{m.target}: a {m.delta.kind} delta reached a writer of low-rank factors")
    return m.delta


def peft_bias(m: LoraModule) -> torch.Tensor:
    """The module's bias change as PEFT's ``lora_B.bias``, which is multiplied by the module's scale:
    a LyCORIS ``diff_b`` (added as it is) divided by that scale (one rounding in its dtype)."""
    if m.bias is None:
        raise InternalError(f"{m.target}: no bias to write")
    if m.bias_scale is None or m.bias_factor == m.scale:
        return m.bias.contiguous()
    if m.scale == 0.0:
        raise UnsupportedAdapterError(f"{m.target}: a bias change beside a zero scale has no lora_B.bias form.",
                                      tensor=m.target)
    return (m.bias.double() * (m.bias_factor / m.scale)).to(m.bias.dtype).contiguous()


def alpha_of(m: LoraModule) -> float:
    """The alpha that reproduces the module's scale with alpha / r."""
    d = lowrank(m)
    if d.alpha is not None and math.isclose(d.alpha / d.rank, d.scale, rel_tol=1e-12, abs_tol=0.0):
        return float(d.alpha)
    return float(d.scale * d.rank)
def pattern_config(modules: dict[str, LoraModule]) -> dict:
    """PEFT-style r / lora_alpha with rank_pattern / alpha_pattern for the modules that differ.

    Keys of ``modules`` are module names (no ``.weight``); patterns are anchored and escaped, so
    PEFT's first-match rule picks exactly one module each.
    """
    return rank_alpha_patterns({n: int(m.rank or 0) for n, m in modules.items()},
                               {n: alpha_of(m) for n, m in modules.items()})


def rank_alpha_patterns(ranks: dict[str, int], alphas: dict[str, float], alpha_key: str = "lora_alpha") -> dict:
    """The most common r and alpha, and anchored, escaped ``rank_pattern`` / ``alpha_pattern``
    entries for the modules that differ (PEFT's first match picks exactly one each)."""
    common_r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    common_a = Counter(alphas.values()).most_common(1)[0][0] if alphas else 8.0
    return {
        "r": common_r,
        alpha_key: common_a,
        "rank_pattern": {f"^{re.escape(n)}": r for n, r in ranks.items() if r != common_r},
        "alpha_pattern": {f"^{re.escape(n)}": a for n, a in alphas.items() if a != common_a},
    }


def fold_scale(m: LoraModule, scale: float) -> LoraModule:
    """The same ΔW expressed with ``scale``: the ratio of the scales is folded into B."""
    return m.with_(delta=lowrank(m).with_scale(scale))


def pad_rank(m: LoraModule, rank: int) -> LoraModule:
    """Zero rows in A and columns in B up to ``rank``: ΔW is unchanged (a format with one global
    rank can then hold it)."""
    return m.with_(delta=lowrank(m).padded(rank))


def most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]
