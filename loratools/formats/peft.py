"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a legacy pickle).

Facts followed here (checked against peft 0.21's source):

* keys are ``base_model.model.<module>.{lora_A.weight (r,in), lora_B.weight (out,r), lora_B.bias}``,
  ``<module>.lora_embedding_A`` (r,V) / ``lora_embedding_B`` (d,r), ``<module>.lora_magnitude_vector``
  (DoRA); other keys (``<module>.weight``, ``<module>.base_layer.bias``…) are full tensors saved for
  ``modules_to_save`` or ``bias="all"`` and replace the base tensor;
* scale = alpha / r, or alpha / sqrt(r) with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern``
  override r and alpha per module, the first key in dict order whose ``(.*\\.)?(key)$`` matches the
  module name winning (``peft.utils.other.get_pattern_key``);
* ``fan_in_fan_out`` declares a base that stores (in, out) — GPT-2 ``Conv1D``; PEFT also switches it
  on by itself when the targeted layer is a ``Conv1D``, which binding reproduces.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, LoraModule, check_finite, lowrank_module
from ..checkpoint.reader import load_state_dict
from ..checkpoint.safetensors_io import save_tensors
from ..errors import AdapterFormatError, AdapterNotFoundError, UnsupportedAdapterError
from ..jsonio import get_field, read_json
from .common import alpha_of, group_keys, lowrank, refuse_leftovers

NAME = "peft"
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# suffix → role, longest first so ".lora_magnitude_vector.weight" wins over ".lora_magnitude_vector"
SUFFIXES: list[tuple[str, str]] = [
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_embedding_A", "A_emb"),
    (".lora_embedding_B", "B_emb"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
]

# init_lora_weights values whose adapters are not a plain delta on the original base
NOT_A_DELTA_INIT = {
    "pissa": "PiSSA moves the adapter's principal components out of the base weights",
    "olora": "OLoRA subtracts its initial factors from the base weights",
    "corda": "CorDA subtracts its initial factors from the base weights",
    "loftq": "LoftQ pairs the adapter with a re-quantized base",
    "lora_ga": "LoRA-GA subtracts its initial factors from the base weights",
}
# config keys naming features whose math is not W + s·B@A
REFUSED_FEATURES = {
    "alora_invocation_tokens": "aLoRA applies the adapter only after its invocation tokens; merged, it would apply everywhere",
    "layer_replication": "layer_replication duplicates base layers, which a merge into the base checkpoint cannot express",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters) is not supported yet",
    "trainable_token_indices": "trainable token deltas (trainable_token_indices) are not supported yet",
    "arrow_config": "Arrow routing mixes several adapters per token and cannot be merged",
    "velora_config": "VeLoRA is not a plain low-rank delta",
    "kasa_config": "KaSA is not a plain low-rank delta",
    "monteclora_config": "MonteCLoRA is not a plain low-rank delta",
    "use_bdlora": "BD-LoRA block-diagonal factors are not supported yet",
}
KNOWN_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "loftq_config", "eva_config",
    "corda_config", "use_dora", "lora_bias", "ensure_weight_tying", "qalora_group_size", "use_qalora",
    "lora_ga_config",
} | set(REFUSED_FEATURES)

def get_pattern_key(pattern_keys: list[str], module_name: str) -> str | None:
    """PEFT's rule: the first key in dict order with ``(.*\\.)?(key)$`` matching the module name."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def module_is_targeted(cfg: dict[str, Any], name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for the config keys that select modules."""
    targets = cfg.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        found = targets == "all-linear" or re.fullmatch(targets, name) is not None
    else:
        found = name in targets or any(name.endswith(f".{t}") for t in targets)
    layers = cfg.get("layers_to_transform")
    if found and layers not in (None, []):
        pattern = cfg.get("layers_pattern")
        patterns = [pattern] if isinstance(pattern, str) else (pattern or [])
        match = None
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        for p in patterns:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if match:
                break
        if match is None:
            return False
        idx = int(match.group("idx"))
        found = idx == layers if isinstance(layers, int) else idx in layers
    return found


def find_files(path: Path) -> tuple[Path, Path]:
    """(config, weights) for a PEFT adapter folder or one of its weight files."""
    if not path.exists():
        raise AdapterNotFoundError(f"Adapter not found: {path}.", path=path)
    folder = path if path.is_dir() else path.parent
    config = folder / CONFIG
    if not config.is_file():
        raise AdapterNotFoundError(
            f"{folder} has no {CONFIG}: not a PEFT adapter.",
            path=folder,
            hint="A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors.",
        )
    if path.is_file():
        return config, path
    for w in WEIGHTS:
        if (folder / w).is_file():
            return config, folder / w
    raise AdapterNotFoundError(
        f"{folder} has {CONFIG} but no {' or '.join(WEIGHTS)}.", path=folder, hint="The adapter folder is incomplete."
    )


def detect(path: Path) -> bool:
    """Yes: adapter_config.json with a peft_type; broken (CorruptFileError): an adapter_config.json
    that is not a JSON object — PEFT's or MLX's, it is an adapter folder either way."""
    folder = path if path.is_dir() else path.parent
    cfg = folder / CONFIG
    if not cfg.is_file():
        return False
    return "peft_type" in read_json(cfg, what="the adapter config")


def read_config(config_path: Path) -> dict[str, Any]:
    cfg = read_json(config_path, what="the adapter config")
    if "peft_type" not in cfg:
        raise AdapterFormatError(f"{config_path} has no 'peft_type': not a PEFT config.", path=config_path)
    return cfg


def check_mergeable(cfg: dict[str, Any], config_path: Path) -> list[str]:
    """Refuse configs whose adapters are not W + s·B@A; return warnings for unknown keys."""
    if str(cfg.get("peft_type")).upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{config_path}: peft_type {cfg.get('peft_type')!r} is not supported; loratools reads LoRA adapters.",
            path=config_path,
        )
    init = cfg.get("init_lora_weights")
    if isinstance(init, str):
        for prefix, why in NOT_A_DELTA_INIT.items():
            if init.lower().startswith(prefix):
                raise UnsupportedAdapterError(
                    f"{config_path}: init_lora_weights={init!r}: {why}, so the adapter is not a delta on the "
                    "original base and merging it would give a wrong model.",
                    path=config_path,
                    hint="Convert it to a plain LoRA first: PEFT's save_pretrained(..., "
                    "path_initial_model_for_weight_conversion=...) writes the equivalent plain adapter.",
                )
    for key, why in REFUSED_FEATURES.items():
        if cfg.get(key):
            raise UnsupportedAdapterError(f"{config_path}: {key} is set: {why}.", path=config_path)
    unknown = sorted(set(cfg) - KNOWN_KEYS - {"lora_parameters"})
    unknown = [k for k in unknown if cfg[k] not in (None, False, {}, [])]
    if unknown:
        return [f"{config_path.name}: ignoring config keys loratools does not know: {', '.join(unknown)}"]
    return []


def _split_state_dict(sd: dict[str, torch.Tensor], weights: Path) -> tuple[
        dict[str, dict[str, tuple[str, torch.Tensor]]], dict[str, torch.Tensor], list[str]]:
    """(LoRA tensors by module and role, full tensors that replace base tensors, PEFT's copies of
    base tensors); a ``lora_`` key in no known role is refused."""
    def split(key: str) -> tuple[str, str] | None:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, role in SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)], role
        return None

    groups, others = group_keys(sd, split)
    parts = {stem: {role: (key, sd[key]) for role, key in roles.items()} for stem, roles in groups.items()}
    replacements: dict[str, torch.Tensor] = {}
    base_copies: list[str] = []  # PEFT's copies of base tensors (``….base_layer.weight``)
    leftovers: list[str] = []
    for key in others:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_" in name:
            leftovers.append(key)
            continue
        # modules_to_save / bias="all" / the embedding copy PEFT saves beside an embedding LoRA
        replacements[name.replace(".base_layer.", ".")] = sd[key]
        if name.endswith(".base_layer.weight"):
            base_copies.append(name.replace(".base_layer.", "."))
    refuse_leftovers(leftovers, weights, what="LoRA keys loratools does not understand",
                     hint="Nothing was merged. Open an issue with the PEFT version that wrote this adapter.")
    return parts, replacements, base_copies


def _target_kind(name: str, A: torch.Tensor, B: torch.Tensor, *, emb: bool, fan_in_fan_out: bool,
                 weights: Path) -> tuple[str, bool | None, tuple[int, ...]]:
    """(kind, transposed — None when the config leaves it to the base —, conv kernel)."""
    if emb:
        return "embedding", True, ()
    if A.dim() > 2:
        if any(int(s) != 1 for s in B.shape[2:]):
            raise UnsupportedAdapterError(
                f"{weights}: conv module {name} has a lora_B kernel {tuple(B.shape[2:])}; only 1×1 lora_B "
                "convs are a plain low-rank delta.",
                path=weights,
            )
        return "conv", False, tuple(int(s) for s in A.shape[2:])
    return "linear", (True if fan_in_fan_out else None), ()


def read(path: Path, **_: object) -> Adapter:
    config_path, weights = find_files(path)
    cfg = read_config(config_path)
    warnings = check_mergeable(cfg, config_path)
    sd = load_state_dict(weights)
    for key, t in sd.items():
        check_finite(t, what=f"adapter tensor {key}", path=weights)

    parts, replacements, base_copies = _split_state_dict(sd, weights)
    rank_pattern: dict[str, int] = get_field(cfg, "rank_pattern", dict, {}, where=config_path)
    alpha_pattern: dict[str, float] = get_field(cfg, "alpha_pattern", dict, {}, where=config_path)
    used_rank: set[str] = set()
    used_alpha: set[str] = set()
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    untargeted: list[str] = []
    modules: dict[str, LoraModule] = {}
    for name, roles in sorted(parts.items()):
        emb = "A_emb" in roles or "B_emb" in roles
        a_role, b_role = ("A_emb", "B_emb") if emb else ("A", "B")
        if a_role not in roles or b_role not in roles:
            have = ", ".join(k for k, _ in roles.values())
            raise AdapterFormatError(
                f"{weights}: module {name} has an incomplete LoRA pair (found {have}).", path=weights, tensor=name
            )
        if not module_is_targeted(cfg, name):
            untargeted.append(name)
        (_, A), (_, B) = roles[a_role], roles[b_role]
        r = int(A.shape[0])
        rkey = get_pattern_key(list(rank_pattern), name)
        akey = get_pattern_key(list(alpha_pattern), name)
        if rkey is not None:
            used_rank.add(rkey)
        if akey is not None:
            used_alpha.add(akey)
        cfg_r = (get_field(rank_pattern, rkey, int, where=config_path, what="rank_pattern") if rkey is not None
                 else get_field(cfg, "r", int, 8, where=config_path))
        alpha = (get_field(alpha_pattern, akey, float, where=config_path, what="alpha_pattern") if akey is not None
                 else get_field(cfg, "lora_alpha", float, 8.0, where=config_path))
        if int(B.shape[1]) != r or cfg_r != r:
            raise AdapterFormatError(
                f"{weights}: module {name} has rank {r} in lora_A and {B.shape[1]} in lora_B, "
                f"the config says r={cfg_r}.",
                path=weights,
                tensor=name,
                hint="PEFT itself would refuse to load this adapter; the config and weights do not belong together.",
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        kind, transposed, kernel = _target_kind(name, A, B, emb=emb, fan_in_fan_out=fan_in_fan_out, weights=weights)
        mag = roles.get("magnitude")
        bias = roles.get("bias")
        modules[name + ".weight"] = lowrank_module(
            name + ".weight",
            A.reshape(r, -1),
            B.reshape(B.shape[0], r),
            scale,
            alpha,
            kind=kind,
            transposed=transposed,
            kernel=kernel,
            magnitude=mag[1].reshape(-1) if mag else None,
            bias=bias[1].reshape(-1) if bias else None,
            bias_target=name + ".bias" if bias else None,
            source_keys=tuple(k for k, _ in roles.values()),
        )
    if untargeted:
        raise AdapterFormatError(
            f"{config_path}: the weights hold modules that target_modules / layers_to_transform do not select: "
            f"{', '.join(untargeted[:6])}{' …' if len(untargeted) > 6 else ''}.",
            path=config_path,
            hint="PEFT would silently skip them. Fix target_modules in adapter_config.json if they belong to the adapter.",
        )
    for key in rank_pattern:
        if key not in used_rank:
            warnings.append(f"rank_pattern key {key!r} matches no module of the adapter")
    for key in alpha_pattern:
        if key not in used_alpha:
            warnings.append(f"alpha_pattern key {key!r} matches no module of the adapter")
    if cfg.get("use_dora") and not any(m.magnitude is not None for m in modules.values()):
        warnings.append("use_dora is set but the weights hold no lora_magnitude_vector; merging as plain LoRA")

    return Adapter(
        modules=modules,
        replacements=replacements,
        meta={
            "format": NAME,
            "config": cfg,
            "base_model": cfg.get("base_model_name_or_path"),
            "fan_in_fan_out": fan_in_fan_out,
            "base_copies": base_copies,
        },
        warnings=warnings,
        path=path,
        files=[config_path, weights],
    )


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, **_: object) -> list[Path]:
    """Write ``adapter`` as a PEFT folder (config + safetensors) into the existing folder ``out``.

    Per-module scales are kept exactly: when modules differ in scale, the most common (r, alpha) is
    the config's and the others go to ``rank_pattern`` / ``alpha_pattern`` with anchored, escaped
    module names.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for target, m in adapter.modules.items():
        name = target.removesuffix(".weight")
        key = PREFIX + name
        d = lowrank(m)
        if m.kind == "embedding":
            tensors[key + ".lora_embedding_A"] = d.A.contiguous()
            tensors[key + ".lora_embedding_B"] = d.B.contiguous()
        elif m.kind == "conv":
            tensors[key + ".lora_A.weight"] = d.A.reshape(d.rank, -1, *m.kernel).contiguous()
            tensors[key + ".lora_B.weight"] = d.B.reshape(m.fan_out, d.rank, *([1] * len(m.kernel))).contiguous()
        else:
            fan_in_fan_out = fan_in_fan_out or bool(m.transposed)
            tensors[key + ".lora_A.weight"] = d.A.contiguous()
            tensors[key + ".lora_B.weight"] = d.B.contiguous()
        if m.magnitude is not None:
            tensors[key + ".lora_magnitude_vector"] = m.magnitude.contiguous()
        if m.bias is not None:
            tensors[key + ".lora_B.bias"] = m.bias.contiguous()
        ranks[name], alphas[name] = d.rank, alpha_of(m)
    lora_modules = {t.removesuffix(".weight") for t in adapter.modules}
    saved_modules: set[str] = set()
    trained_biases = False
    for target, t in adapter.replacements.items():
        module, _, param = target.rpartition(".")
        if module in lora_modules:
            # a full tensor of a LoRA-targeted module (its bias): PEFT keeps it as base_layer.<param>
            # with bias="all", since modules_to_save would stop the LoRA from applying
            tensors[f"{PREFIX}{module}.base_layer.{param}"] = t.contiguous()
            trained_biases = trained_biases or param == "bias"
        else:
            tensors[PREFIX + target] = t.contiguous()
            saved_modules.add(module)
    common_r = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 8
    common_a = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else 8
    cfg = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model or adapter.meta.get("base_model"),
        "r": common_r,
        "lora_alpha": common_a,
        "target_modules": sorted(ranks),
        "rank_pattern": {f"^{re.escape(n)}": r for n, r in ranks.items() if r != common_r},
        "alpha_pattern": {f"^{re.escape(n)}": a for n, a in alphas.items() if a != common_a},
        "fan_in_fan_out": bool(fan_in_fan_out),
        "use_rslora": False,
        "use_dora": any(m.magnitude is not None for m in adapter.modules.values()),
        "lora_bias": any(m.bias is not None for m in adapter.modules.values()),
        "modules_to_save": sorted(saved_modules) or None,
        "bias": "all" if trained_biases else "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "task_type": (adapter.meta.get("config") or {}).get("task_type"),
    }
    (out / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    save_tensors(out / WEIGHTS[0], tensors, {"format": "pt"})
    return [out / CONFIG, out / WEIGHTS[0]]
