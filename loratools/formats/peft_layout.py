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

from ..errors import AdapterFormatError, AdapterNotFoundError, CorruptFileError, UnsupportedAdapterError
from ..jsonio import clip, get_field, read_json
from .keys import group_keys, refuse_leftovers
from .patterns import BUDGET_SECONDS, MAX_PATTERN, Pattern, compile_pattern, first_match, pattern_keys, time_limit

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

@dataclass(frozen=True)
class Settings:
    """The fields of a PEFT config that loratools uses, each checked (``jsonio.get_field``) and
    every regex compiled within its cost bound (``patterns.py``)."""

    peft_type: str
    r: int
    alpha: float
    rslora: bool
    fan_in_fan_out: bool
    use_dora: bool
    init: bool | str
    base_model: str | None
    task_type: str | None
    all_modules: bool  # target_modules absent or "all-linear": every module of the weights is targeted
    target_regex: re.Pattern[str] | None  # target_modules as a string: fullmatch on the module name
    target_names: frozenset[str]  # target_modules as a list: the name or a ".name" suffix
    target_longest: int
    layers: frozenset[int] | None  # layers_to_transform
    layer_patterns: tuple[re.Pattern[str], ...]  # layers_pattern, compiled as PEFT uses it
    rank_pattern: tuple[Pattern, ...]
    ranks: dict[str, int]
    alpha_pattern: tuple[Pattern, ...]
    alphas: dict[str, float]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _strings(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def read_settings(cfg: dict[str, Any], where: Path) -> Settings:
    """Every config field loratools reads, checked; a CorruptFileError names the file and field."""
    def field(key: str, kind: Any, default: Any = None, **kw: Any) -> Any:
        return get_field(cfg, key, kind, default, where=where, **kw)

    for key, must in (("r", "a positive integer"), ("lora_alpha", "a finite number")):
        if key in cfg and cfg[key] is None:  # PEFT computes lora_alpha / r: an explicit null is no default
            raise CorruptFileError(f"{where}: config field {key!r} is not valid: it must be {must}, not null.",
                                   path=where)
    peft_type = field("peft_type", str, "")
    targets = field("target_modules", (str, list), None, check=_strings, must="a string or a list of strings")
    layers = field("layers_to_transform", (int, list), None,
                   check=lambda v: _is_int(v) or all(_is_int(x) for x in v), must="an integer or a list of integers")
    layers_pattern = field("layers_pattern", (str, list), None, check=_strings, must="a string or a list of strings")
    rank_pattern: dict[str, Any] = field("rank_pattern", dict, {})
    alpha_pattern: dict[str, Any] = field("alpha_pattern", dict, {})
    for patterns, what, kind, must in ((rank_pattern, "rank_pattern", int, "a positive integer"),
                                       (alpha_pattern, "alpha_pattern", float, "a finite number")):
        for key in patterns:
            if patterns[key] is None:
                raise CorruptFileError(f"{where}: {what} field {clip(repr(key))} is not valid: it must be {must}, "
                                       "not null.", path=where)
            get_field(patterns, key, kind, where=where, what=what, must=must,
                      check=(lambda v: v > 0) if kind is int else None)
    target_regex = None
    names: list[str] = []
    if isinstance(targets, str) and targets != "all-linear":
        target_regex = compile_pattern(targets, where=where, what="target_modules")
    elif isinstance(targets, list):
        names = targets
        too_long = next((t for t in names if len(t) > MAX_PATTERN), None)
        if too_long is not None:
            raise CorruptFileError(f"{where}: target_modules holds a name of {len(too_long)} characters "
                                   f"({clip(too_long)}); module names are shorter than {MAX_PATTERN}.", path=where)
    if layers is not None and layers_pattern is not None:
        lp = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        compiled = tuple(compile_pattern(p, where=where, what="layers_pattern", template=r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")
                         for p in lp)
    else:
        compiled = ()
    return Settings(
        peft_type=peft_type,
        r=field("r", int, 8, check=lambda v: v > 0, must="a positive integer"),
        alpha=field("lora_alpha", float, 8.0, must="a finite number"),
        rslora=field("use_rslora", bool, False),
        fan_in_fan_out=field("fan_in_fan_out", bool, False),
        use_dora=field("use_dora", bool, False),
        init=field("init_lora_weights", (bool, str), True),
        base_model=field("base_model_name_or_path", str, None),
        task_type=field("task_type", str, None),
        all_modules=targets is None or targets == "all-linear",
        target_regex=target_regex,
        target_names=frozenset(names),
        target_longest=max((len(t) for t in names), default=0),
        layers=None if layers in (None, []) else frozenset([layers] if isinstance(layers, int) else layers),
        layer_patterns=compiled,
        rank_pattern=tuple(pattern_keys(list(rank_pattern), where=where, what="rank_pattern")),
        ranks={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern=tuple(pattern_keys(list(alpha_pattern), where=where, what="alpha_pattern")),
        alphas={k: float(v) for k, v in alpha_pattern.items()},
    )


_DEFAULT_LAYER = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def _names_target(s: Settings, name: str) -> bool:
    """``name in target_modules or any(name.endswith("." + t))``, in time linear in the name."""
    if name in s.target_names:
        return True
    i = name.rfind(".", 0, len(name))
    while i >= 0 and len(name) - i - 1 <= s.target_longest:
        if name[i + 1:] in s.target_names:
            return True
        i = name.rfind(".", 0, i)
    return False


def module_is_targeted(s: Settings, name: str) -> bool:
    """PEFT's ``check_target_module_exists`` for the config keys that select modules."""
    if s.all_modules:
        found = True
    elif s.target_regex is not None:
        found = s.target_regex.fullmatch(name) is not None
    else:
        found = _names_target(s, name)
    if found and s.layers is not None:
        match = None
        if not s.layer_patterns:
            match = _DEFAULT_LAYER.match(name)
        for p in s.layer_patterns:
            match = p.match(name)
            if match:
                break
        if match is None or len(match.group("idx")) > 18:  # no layer index (or no plausible one)
            return False
        found = int(match.group("idx")) in s.layers
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


def check_mergeable(cfg: dict[str, Any], config_path: Path, settings: Settings | None = None) -> list[str]:
    """Refuse configs whose adapters are not W + s·B@A; return warnings for unknown keys."""
    s = settings or read_settings(cfg, config_path)
    if s.peft_type.upper() != "LORA":
        raise UnsupportedAdapterError(
            f"{config_path}: peft_type {clip(repr(s.peft_type))} is not supported; loratools reads LoRA adapters.",
            path=config_path,
        )
    if isinstance(s.init, str):
        for prefix, why in NOT_A_DELTA_INIT.items():
            if s.init.lower().startswith(prefix):
                raise UnsupportedAdapterError(
                    f"{config_path}: init_lora_weights={clip(repr(s.init))}: {why}, so the adapter is not a delta on "
                    "the original base and merging it would give a wrong model.",
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
        shown = ", ".join(clip(k) for k in unknown[:8]) + (f" … ({len(unknown)} in all)" if len(unknown) > 8 else "")
        return [f"{config_path.name}: ignoring config keys loratools does not know: {shown}"]
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
    settings: Settings | None = None


def _split_keys(keys: list[str], weights: Path, plan: StateDictPlan) -> dict[str, dict[str, str]]:
    """LoRA keys by module and role; the rest are full tensors; a ``lora_`` key in no known role is
    refused."""
    def split(key: str) -> tuple[str, str] | None:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, role in SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)], role
        return None

    groups, others = group_keys(keys, split, path=weights)
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
                f"{weights}: conv module {clip(name)} has a lora_B kernel {tuple(b_shape[2:])}; only 1×1 lora_B "
                "convs are a plain low-rank delta.",
                path=weights,
            )
        return "conv", False, tuple(int(s) for s in a_shape[2:])
    return "linear", (True if fan_in_fan_out else None), ()


def _shape_problem(a_shape: tuple[int, ...], b_shape: tuple[int, ...], emb: bool) -> str | None:
    """What makes a factor pair's shapes impossible for PEFT, or None."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        return "LoRA factors are matrices"
    if emb and (len(a_shape) != 2 or len(b_shape) != 2):
        return "embedding factors are matrices"
    if len(a_shape) == 2 and len(b_shape) != 2:
        return "a linear lora_A goes with a 2-D lora_B"
    if len(a_shape) > 2 and len(b_shape) not in (2, len(a_shape)):
        return "a conv lora_B has the dimensions of its lora_A"
    if a_shape[0] == 0:
        return "a LoRA of rank 0 has no factors"
    if 0 in a_shape or 0 in b_shape:
        return "a factor with a dimension of 0 changes nothing"
    return None


def plan_state_dict(cfg: dict[str, Any], config_path: Path, weights: Path,
                    shapes: Mapping[str, tuple[int, ...]]) -> StateDictPlan:
    """What every key of a PEFT file is, from the config and the tensors' shapes (in file order)."""
    settings = read_settings(cfg, config_path)
    plan = StateDictPlan(warnings=check_mergeable(cfg, config_path, settings), settings=settings)
    parts = _split_keys(list(shapes), weights, plan)

    def too_slow() -> Exception:
        return CorruptFileError(
            f"{config_path}: matching target_modules / layers_pattern / rank_pattern / alpha_pattern against the "
            f"module names took more than {BUDGET_SECONDS:g} s; a pattern backtracks catastrophically.",
            path=config_path, hint="Use module names (e.g. q_proj) instead of regular expressions in the config.")

    with time_limit(too_slow):
        modules, untargeted, used_rank, used_alpha = _plan_modules(settings, parts, config_path, weights, shapes)
    plan.modules += modules
    if untargeted:
        raise AdapterFormatError(
            f"{config_path}: the weights hold modules that target_modules / layers_to_transform do not select: "
            f"{', '.join(clip(u) for u in untargeted[:6])}{' …' if len(untargeted) > 6 else ''}.",
            path=config_path,
            hint="PEFT would silently skip them. Fix target_modules in adapter_config.json if they belong to the adapter.",
        )
    plan.warnings += [f"rank_pattern key {clip(repr(p.key))} matches no module of the adapter"
                      for p in settings.rank_pattern[:20] if p.key not in used_rank]
    plan.warnings += [f"alpha_pattern key {clip(repr(p.key))} matches no module of the adapter"
                      for p in settings.alpha_pattern[:20] if p.key not in used_alpha]
    if settings.use_dora and not any("magnitude" in m.keys for m in plan.modules):
        plan.warnings.append("use_dora is set but the weights hold no lora_magnitude_vector; merging as plain LoRA")
    return plan


def _plan_modules(s: Settings, parts: dict[str, dict[str, str]], config_path: Path, weights: Path,
                  shapes: Mapping[str, tuple[int, ...]]) -> tuple[list[ModuleSpec], list[str], set[str], set[str]]:
    modules: list[ModuleSpec] = []
    used_rank: set[str] = set()
    used_alpha: set[str] = set()
    untargeted: list[str] = []
    for name, roles in sorted(parts.items()):
        emb = "A_emb" in roles or "B_emb" in roles
        a_role, b_role = ("A_emb", "B_emb") if emb else ("A", "B")
        if a_role not in roles or b_role not in roles:
            have = ", ".join(clip(k) for k in roles.values())
            raise AdapterFormatError(
                f"{weights}: module {clip(name)} has an incomplete LoRA pair (found {have}).", path=weights,
                tensor=name)
        if not module_is_targeted(s, name):
            untargeted.append(name)
        a_shape, b_shape = tuple(shapes[roles[a_role]]), tuple(shapes[roles[b_role]])
        problem = _shape_problem(a_shape, b_shape, emb)
        if problem:
            raise AdapterFormatError(f"{weights}: module {clip(name)} has factors of shapes {a_shape} and {b_shape}; "
                                     f"{problem}.", path=weights, tensor=name)
        r = int(a_shape[0])
        rkey = first_match(s.rank_pattern, name)
        akey = first_match(s.alpha_pattern, name)
        if rkey is not None:
            used_rank.add(rkey)
        if akey is not None:
            used_alpha.add(akey)
        cfg_r = s.ranks[rkey] if rkey is not None else s.r
        alpha = s.alphas[akey] if akey is not None else s.alpha
        if int(b_shape[1]) != r or cfg_r != r:
            raise AdapterFormatError(
                f"{weights}: module {clip(name)} has rank {r} in lora_A and {b_shape[1]} in lora_B, "
                f"the config says r={cfg_r}.",
                path=weights,
                tensor=name,
                hint="PEFT itself would refuse to load this adapter; the config and weights do not belong together.",
            )
        scale = alpha / math.sqrt(r) if s.rslora else alpha / r
        kind, transposed, kernel = _target_kind(name, a_shape, b_shape, emb=emb, fan_in_fan_out=s.fan_in_fan_out,
                                                weights=weights)
        modules.append(ModuleSpec(name, dict(roles), r, alpha, scale, kind, transposed, kernel,
                                  roles[a_role], roles[b_role]))
    return modules, untargeted, used_rank, used_alpha
