"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a legacy pickle).

What the config and the header decide (keys, ranks, scales, kinds, refusals) is in
``peft_layout.py``; this module loads the tensors and writes adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, check_finite, lowrank_module
from ..checkpoint.reader import load_state_dict
from ..checkpoint.safetensors_io import load_tensors, read_header, save_tensors
from ..errors import AdapterFormatError
from ..jsonio import clip
from . import peft_loha_lokr, peft_params, peft_transforms
from .common import alpha_of, check_factor, lowrank, peft_bias, rank_alpha_patterns, with_record
from .peft_layout import CONFIG, NAME, PREFIX, WEIGHTS, find_files, plan_state_dict, read_config, read_settings
from .peft_layout import detect

__all__ = ["NAME", "detect", "read", "write"]  # detect comes from the torch-free layout module

def read(path: Path, *, base_config: dict | None = None, **_: object) -> Adapter:
    config_path, weights = find_files(path)
    cfg = read_config(config_path)
    if cfg.get("target_parameters"):  # LoRA on fused MoE expert parameters
        if not cfg.get("target_modules"):
            return peft_params.read(path, cfg, config_path, weights, base_config)
        return _read_mixed(path, cfg, config_path, weights, base_config)
    if str(cfg.get("peft_type", "")).upper() in peft_transforms.TYPES:  # (IA)³, OFT: functions of W
        return peft_transforms.read(path, cfg, config_path, weights)
    if str(cfg.get("peft_type", "")).upper() in peft_loha_lokr.TYPES:
        return peft_loha_lokr.read(path, cfg, config_path, weights)
    return _read_lora(path, cfg, config_path, weights)


def _read_mixed(path: Path, cfg: dict, config_path: Path, weights: Path, base_config: dict | None) -> Adapter:
    """target_modules and target_parameters in one adapter (attention LoRA beside expert LoRA): the
    keys of the parameter wrappers (the modules owning a targeted parameter) are read as such, the
    rest as module LoRA; every key is one or the other."""
    names = list(read_header(weights).tensors) if weights.suffix == ".safetensors" else list(load_state_dict(weights))
    owners = {p.rsplit(".", 1)[0] for p in cfg["target_parameters"] if "." in p}
    wrapped = {k for k in names if (m := peft_params.KEY.match(k)) and any(
        m["module"] == o or m["module"].endswith("." + o) for o in owners)}
    experts = peft_params.read(path, {k: v for k, v in cfg.items() if k != "target_modules"}, config_path, weights,
                               base_config, keys=wrapped)
    plain = _read_lora(path, {k: v for k, v in cfg.items() if k != "target_parameters"}, config_path, weights,
                       keys=set(names) - wrapped)
    clash = set(experts.modules) & set(plain.modules)
    if clash:
        raise AdapterFormatError(f"{weights}: {clip(sorted(clash)[0])} is adapted both as a module and as a parameter.",
                                 path=weights)
    meta = dict(plain.meta, target_parameters=experts.meta.get("target_parameters"))
    return Adapter(modules={**plain.modules, **experts.modules}, replacements=plain.replacements, meta=meta,
                   warnings=plain.warnings, path=path, files=[config_path, weights])


def _read_lora(path: Path, cfg: dict, config_path: Path, weights: Path, keys: set[str] | None = None) -> Adapter:
    """PEFT LoRA on modules (``keys``: only these tensors of the file)."""
    if weights.suffix == ".safetensors":  # the plan (and its refusals) from the header, before any tensor is read
        header = read_header(weights)
        infos = [t for k, t in header.tensors.items() if keys is None or k in keys]
        plan = plan_state_dict(cfg, config_path, weights, {t.name: t.shape for t in infos})
        sd = {} if not plan.modules and not plan.replacements else load_tensors(infos)
    else:
        sd = {k: v for k, v in load_state_dict(weights).items() if keys is None or k in keys}
        plan = plan_state_dict(cfg, config_path, weights, {k: tuple(t.shape) for k, t in sd.items()})
    settings = plan.settings or read_settings(cfg, config_path)
    if not plan.modules and not plan.replacements:
        raise AdapterFormatError(f"{weights} holds no tensors: an empty adapter.", path=weights)
    factors = {key for spec in plan.modules for key in spec.keys.values()}
    for key, t in sd.items():
        if key in factors:
            check_factor(t, key, weights)
        else:
            check_finite(t, what=f"{weights}: adapter tensor {clip(key)}", path=weights)
    modules: dict[str, LoraModule] = {}
    for spec in plan.modules:
        A, B = sd[spec.a_key], sd[spec.b_key]
        mag, bias = spec.keys.get("magnitude"), spec.keys.get("bias")
        modules[spec.name + ".weight"] = lowrank_module(
            spec.name + ".weight",
            A.reshape(spec.rank, -1),
            B.reshape(B.shape[0], spec.rank),
            spec.scale,
            spec.alpha,
            kind=spec.kind,
            transposed=spec.transposed,
            kernel=spec.kernel,
            magnitude=sd[mag].reshape(-1) if mag else None,
            bias=sd[bias].reshape(-1) if bias else None,
            bias_target=spec.name + ".bias" if bias else None,
            source_keys=tuple(spec.keys.values()),
        )
    return Adapter(
        modules=modules,
        replacements={target: sd[key] for target, key in plan.replacements.items()},
        meta={
            "format": NAME,
            "config": cfg,
            "base_model": settings.base_model,
            "fan_in_fan_out": settings.fan_in_fan_out,
            "base_copies": plan.base_copies,
        },
        warnings=plan.warnings,
        path=path,
        files=[config_path, weights],
    )


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, record: str | None = None,
          **_: object) -> list[Path]:
    """Write ``adapter`` as a PEFT folder (config + safetensors) into the existing folder ``out``.

    Per-module scales are kept exactly: when modules differ in scale, the most common (r, alpha) is
    the config's and the others go to ``rank_pattern`` / ``alpha_pattern`` with anchored, escaped
    module names. An adapter of LoHa or LoKr modules is written as PEFT's LOHA / LOKR type
    (``peft_loha_lokr``).
    """
    kind = peft_loha_lokr.kind_of(adapter)
    if kind == "IA3":
        return peft_transforms.write_ia3(adapter, out, base_model=base_model, record=record, config_path=CONFIG,
                                         weights_name=WEIGHTS[0])
    if kind is not None:
        return peft_loha_lokr.write(adapter, out, kind, base_model=base_model, record=record, config_path=CONFIG,
                                    weights_name=WEIGHTS[0])
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
            tensors[key + ".lora_B.bias"] = peft_bias(m)
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
    cfg = {
        "peft_type": "LORA",
        "base_model_name_or_path": base_model or adapter.meta.get("base_model"),
        **rank_alpha_patterns(ranks, alphas),
        "target_modules": sorted(ranks),
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
    save_tensors(out / WEIGHTS[0], tensors, with_record({"format": "pt"}, record))
    return [out / CONFIG, out / WEIGHTS[0]]
