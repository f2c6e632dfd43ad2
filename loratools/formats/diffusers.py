"""diffusers LoRA files (``pytorch_lora_weights.safetensors``).

Keys are PEFT-style with a component prefix: ``unet.<module>.lora_A.weight`` / ``lora_B.weight``
(also ``text_encoder.``, ``text_encoder_2.``, ``transformer.``). Alphas travel either as
``<module>.alpha`` tensors or in the safetensors metadata ``lora_adapter_metadata``: a JSON object
of ``"<component>.<LoraConfig field>"`` entries (``unet.r``, ``unet.lora_alpha``,
``unet.rank_pattern``…), which PEFT's first-match pattern rule applies to module names relative to
the component. Without either, alpha = rank (scale 1), as diffusers assumes.

The old attention-processor layout (``….attn1.processor.to_q_lora.down.weight`` / ``.up.weight``)
is read too: ``to_out_lora`` adapts ``to_out.0``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, lowrank_module
from ..checkpoint.safetensors_io import read_header, save_tensors
from ..errors import AdapterFormatError, AdapterNotFoundError, CorruptFileError, UnsupportedAdapterError
from ..jsonio import clip, get_field, load_json
from .common import (check_rank, check_scale, component_of, default_component, load_groups, lowrank, pattern_config,
                     peft_bias, scalar, with_record)
from .keys import group_keys, refuse_leftovers
from .patterns import Pattern, first_match, pattern_keys, time_limit

NAME = "diffusers"
WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
ADDED_KEY = "loratools_added_component"
ROLES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "magnitude", ".lora_B.bias": "bias",
         ".alpha": "alpha"}
OLD = re.compile(r"^(?P<parent>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")


def _file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / WEIGHTS).is_file():
        return path / WEIGHTS
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise AdapterNotFoundError(f"{path}: no {WEIGHTS}.", path=path)
    return files[0]


def detect(path: Path) -> bool:
    if path.is_dir() and (path / "adapter_config.json").exists():
        return False  # a PEFT folder
    try:
        f = _file(path)
    except AdapterNotFoundError:
        return False
    if f.suffix != ".safetensors":
        return False
    names = list(read_header(f).tensors)
    return any(component_of(n)[0] is not None and (n.endswith(tuple(ROLES)) or OLD.match(n)) for n in names)


@dataclass(frozen=True)
class _Component:
    """The LoraConfig fields of one component that reading uses, checked."""

    alpha: float | None
    rslora: bool
    alpha_pattern: tuple[Pattern, ...]
    alphas: dict[str, float]


def _components_config(metadata: dict[str, str], f: Path) -> dict[str, _Component]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    what = f"metadata {METADATA_KEY}"
    flat = load_json(raw, where=f, what=what)
    fields: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        fields.setdefault(component, {})[name] = value
    configs: dict[str, _Component] = {}
    for component, cfg in fields.items():
        where_what = f"{what} of {clip(component)}"
        patterns = get_field(cfg, "alpha_pattern", dict, {}, where=f, what=where_what)
        alphas = {k: get_field(patterns, k, float, float("nan"), where=f, what=f"{where_what} alpha_pattern",
                               must="a finite number") for k in patterns}
        if any(math.isnan(a) for a in alphas.values()):  # null: no default exists for a pattern's alpha
            raise CorruptFileError(f"{f}: {where_what} alpha_pattern holds a null alpha.", path=f)
        configs[component] = _Component(
            alpha=get_field(cfg, "lora_alpha", float, None, where=f, what=where_what, must="a finite number"),
            rslora=get_field(cfg, "use_rslora", bool, False, where=f, what=where_what),
            alpha_pattern=tuple(pattern_keys(list(patterns), where=f, what=f"{where_what} alpha_pattern")),
            alphas=alphas,
        )
    return configs


def read(path: Path, **_: object) -> Adapter:
    f = _file(path)
    header = read_header(f)
    configs = _components_config(header.metadata, f)
    by_suffix = {suffix: role for suffix, role in ROLES.items()}

    def split(key: str) -> tuple[str, str] | None:
        old = OLD.match(key)
        if old:
            proj = old["proj"] + (".0" if old["proj"] == "to_out" else "")
            return f"{old['parent']}.{proj}", "A" if old["role"] == "down" else "B"
        for suffix, role in by_suffix.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], role
        return None

    named, leftovers = group_keys(header.tensors, split, path=f)
    refuse_leftovers(leftovers, f)
    groups = load_groups(header, named, f)

    def too_slow() -> Exception:
        return CorruptFileError(f"{f}: matching the alpha_pattern of {METADATA_KEY} against the module names took "
                                "too long; a pattern backtracks catastrophically.", path=f)

    modules: dict[str, LoraModule] = {}
    with time_limit(too_slow):
        for module, roles in sorted(groups.items()):
            modules[module + ".weight"] = _module(f, module, roles, configs)
    added = header.metadata.get(ADDED_KEY)
    if added:  # written by loratools for targets without a component: give them their own names back
        modules = {n.removeprefix(added + "."): m.with_(target=n.removeprefix(added + "."),
                                                       bias_target=m.bias_target and m.bias_target.removeprefix(added + "."))
                   for n, m in modules.items()}
    if not modules:
        raise AdapterFormatError(f"{f} holds no LoRA factor pairs.", path=f)
    return Adapter(modules=modules, meta={"format": NAME, "components": sorted(configs)}, path=path, files=[f])


def _module(f: Path, module: str, roles: dict[str, tuple[str, torch.Tensor]],
            configs: dict[str, _Component]) -> LoraModule:
    if "A" not in roles or "B" not in roles:
        raise AdapterFormatError(f"{f}: {clip(module)} lacks its lora_A or lora_B.", path=f, tensor=module)
    (_, A), (bk, B) = roles["A"], roles["B"]
    r = check_rank(f, module, tuple(A.shape), tuple(B.shape), what="lora_A / lora_B")
    if int(B.shape[1]) != r:
        raise AdapterFormatError(f"{f}: {clip(module)} has rank {r} in lora_A and {B.shape[1]} in lora_B.", path=f,
                                 tensor=module)
    if any(int(s) != 1 for s in B.shape[2:]):
        raise UnsupportedAdapterError(f"{f}: {clip(bk)} has a {tuple(B.shape[2:])} kernel; only 1×1 lora_B is a "
                                      "plain low-rank delta.", path=f, tensor=bk)
    component, rel = component_of(module)
    cfg = configs.get(component or "")
    if "alpha" in roles:
        alpha = scalar(roles["alpha"][1], roles["alpha"][0], f)
    elif cfg is not None:
        akey = first_match(cfg.alpha_pattern, rel)
        alpha = cfg.alphas[akey] if akey is not None else (cfg.alpha if cfg.alpha is not None else float(r))
    else:
        alpha = float(r)
    check_scale(f, module, alpha, what="alpha")
    scale = alpha / math.sqrt(r) if cfg is not None and cfg.rslora else alpha / r
    kernel = tuple(int(s) for s in A.shape[2:])
    return lowrank_module(
        module + ".weight", A.reshape(r, -1), B.reshape(B.shape[0], r), scale, alpha,
        kind="conv" if kernel else "linear", transposed=False, kernel=kernel,
        magnitude=roles["magnitude"][1].reshape(-1) if "magnitude" in roles else None,
        bias=roles["bias"][1].reshape(-1) if "bias" in roles else None,
        bias_target=module + ".bias" if "bias" in roles else None,
        source_keys=tuple(k for k, _ in roles.values()),
    )


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, base_config: dict | None = None,
          record: str | None = None, **_: object) -> list[Path]:
    """One diffusers LoRA file: PEFT-style keys, alphas in ``lora_adapter_metadata`` per component."""
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, LoraModule]] = {}
    added = ""
    for target, m in sorted(adapter.modules.items()):
        module = target.removesuffix(".weight")
        component, rel = component_of(module)
        if component is None:  # diffusers needs a component; remember that we added it
            component = default_component(base_config)
            module, added = f"{component}.{module}", component
        d = lowrank(m)
        tensors[f"{module}.lora_A.weight"] = d.A.reshape(d.rank, -1, *m.kernel).contiguous()
        tensors[f"{module}.lora_B.weight"] = d.B.reshape(m.fan_out, d.rank, *([1] * len(m.kernel))).contiguous()
        if m.magnitude is not None:
            tensors[f"{module}.lora_magnitude_vector"] = m.magnitude.contiguous()
        if m.bias is not None:
            tensors[f"{module}.lora_B.bias"] = peft_bias(m)
        per_component.setdefault(component, {})[rel] = m
    metadata: dict[str, object] = {}
    for component, mods in per_component.items():
        cfg = pattern_config(mods)
        cfg.update({"target_modules": sorted(mods), "use_dora": any(m.magnitude is not None for m in mods.values()),
                    "lora_bias": any(m.bias is not None for m in mods.values()), "use_rslora": False})
        metadata.update({f"{component}.{k}": v for k, v in cfg.items()})
    file_meta = {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)}
    if added:
        file_meta[ADDED_KEY] = added
    save_tensors(out / WEIGHTS, tensors, with_record(file_meta, record))
    return [out / WEIGHTS]
