"""PEFT adapters at the level of names, shapes and config — no tensor data, no torch.

Everything about a PEFT adapter that its config and the file's header decide lives here: which
keys form which module, each module's rank, alpha, scale, kind and orientation, which keys are
full tensors, and every refusal and warning that follows from them (:func:`plan_state_dict`).
``peft.py`` loads the tensors the plan names; ``loratools info`` summarises an adapter from the
plan and the header alone, without importing torch (``loratools/summary.py``).

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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError, AdapterNotFoundError, UnsupportedAdapterError
from ..jsonio import get_field, read_json
from .keys import group_keys, refuse_leftovers

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


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA module of a PEFT file, decided from names, shapes and the config."""

    name: str  # module path (without ``.weight``)
    keys: dict[str, str]  # role (A, B, A_emb, B_emb, magnitude, bias) → key in the file
    rank: int
    alpha: float
    scale: float
    kind: str  # linear | conv | embedding
    transposed: bool | None  # None: the base decides (binding)
    kernel: tuple[int, ...]
    a_key: str
    b_key: str


@dataclass
class StateDictPlan:
    modules: list[ModuleSpec] = field(default_factory=list)
    replacements: dict[str, str] = field(default_factory=dict)  # target name → key
    base_copies: list[str] = field(default_factory=list)  # PEFT's copies of base tensors
    warnings: list[str] = field(default_factory=list)


def _split_keys(keys: list[str], weights: Path, plan: StateDictPlan) -> dict[str, dict[str, str]]:
    """LoRA keys by module and role; the rest are full tensors; a ``lora_`` key in no known role is
    refused."""
    def split(key: str) -> tuple[str, str] | None:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, role in SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)], role
        return None

    groups, others = group_keys(keys, split)
    leftovers: list[str] = []
    for key in others:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if "lora_" in name:
            leftovers.append(key)
            continue
        # modules_to_save / bias="all" / the embedding copy PEFT saves beside an embedding LoRA
        plan.replacements[name.replace(".base_layer.", ".")] = key
        if name.endswith(".base_layer.weight"):
            plan.base_copies.append(name.replace(".base_layer.", "."))
    refuse_leftovers(leftovers, weights, what="LoRA keys loratools does not understand",
                     hint="Nothing was merged. Open an issue with the PEFT version that wrote this adapter.")
    return groups


def _target_kind(name: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], *, emb: bool,
                 fan_in_fan_out: bool, weights: Path) -> tuple[str, bool | None, tuple[int, ...]]:
    """(kind, transposed — None when the config leaves it to the base —, conv kernel)."""
    if emb:
        return "embedding", True, ()
    if len(a_shape) > 2:
        if any(int(s) != 1 for s in b_shape[2:]):
            raise UnsupportedAdapterError(
                f"{weights}: conv module {name} has a lora_B kernel {tuple(b_shape[2:])}; only 1×1 lora_B "
                "convs are a plain low-rank delta.",
                path=weights,
            )
        return "conv", False, tuple(int(s) for s in a_shape[2:])
    return "linear", (True if fan_in_fan_out else None), ()


def plan_state_dict(cfg: dict[str, Any], config_path: Path, weights: Path,
                    shapes: Mapping[str, tuple[int, ...]]) -> StateDictPlan:
    """What every key of a PEFT file is, from the config and the tensors' shapes (in file order)."""
    plan = StateDictPlan(warnings=check_mergeable(cfg, config_path))
    parts = _split_keys(list(shapes), weights, plan)
    rank_pattern: dict[str, int] = get_field(cfg, "rank_pattern", dict, {}, where=config_path)
    alpha_pattern: dict[str, float] = get_field(cfg, "alpha_pattern", dict, {}, where=config_path)
    used_rank: set[str] = set()
    used_alpha: set[str] = set()
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    untargeted: list[str] = []
    for name, roles in sorted(parts.items()):
        emb = "A_emb" in roles or "B_emb" in roles
        a_role, b_role = ("A_emb", "B_emb") if emb else ("A", "B")
        if a_role not in roles or b_role not in roles:
            have = ", ".join(roles.values())
            raise AdapterFormatError(
                f"{weights}: module {name} has an incomplete LoRA pair (found {have}).", path=weights, tensor=name
            )
        if not module_is_targeted(cfg, name):
            untargeted.append(name)
        a_shape, b_shape = tuple(shapes[roles[a_role]]), tuple(shapes[roles[b_role]])
        if len(a_shape) < 2 or len(b_shape) < 2:
            raise AdapterFormatError(f"{weights}: module {name} has factors of shapes {a_shape} and {b_shape}; "
                                     "LoRA factors are matrices.", path=weights, tensor=name)
        r = int(a_shape[0])
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
        if int(b_shape[1]) != r or cfg_r != r or r == 0:
            raise AdapterFormatError(
                f"{weights}: module {name} has rank {r} in lora_A and {b_shape[1]} in lora_B, "
                f"the config says r={cfg_r}.",
                path=weights,
                tensor=name,
                hint="PEFT itself would refuse to load this adapter; the config and weights do not belong together.",
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        kind, transposed, kernel = _target_kind(name, a_shape, b_shape, emb=emb, fan_in_fan_out=fan_in_fan_out,
                                                weights=weights)
        plan.modules.append(ModuleSpec(name, dict(roles), r, alpha, scale, kind, transposed, kernel,
                                       roles[a_role], roles[b_role]))
    if untargeted:
        raise AdapterFormatError(
            f"{config_path}: the weights hold modules that target_modules / layers_to_transform do not select: "
            f"{', '.join(untargeted[:6])}{' …' if len(untargeted) > 6 else ''}.",
            path=config_path,
            hint="PEFT would silently skip them. Fix target_modules in adapter_config.json if they belong to the adapter.",
        )
    plan.warnings += [f"rank_pattern key {k!r} matches no module of the adapter" for k in rank_pattern
                      if k not in used_rank]
    plan.warnings += [f"alpha_pattern key {k!r} matches no module of the adapter" for k in alpha_pattern
                      if k not in used_alpha]
    if cfg.get("use_dora") and not any("magnitude" in m.keys for m in plan.modules):
        plan.warnings.append("use_dora is set but the weights hold no lora_magnitude_vector; merging as plain LoRA")
    return plan
