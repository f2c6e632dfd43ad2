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
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, lowrank_module
from ..checkpoint.safetensors_io import read_header, save_tensors
from ..errors import AdapterFormatError, AdapterNotFoundError
from ..jsonio import load_json
from .common import component_of, default_component, load_groups, lowrank, pattern_config
from .keys import group_keys, refuse_leftovers
from .peft_layout import get_pattern_key

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


def _components_config(metadata: dict[str, str]) -> dict[str, dict]:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    flat = load_json(raw, what=f"metadata {METADATA_KEY}")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        configs.setdefault(component, {})[field] = value
    return configs


def read(path: Path, **_: object) -> Adapter:
    f = _file(path)
    header = read_header(f)
    try:
        configs = _components_config(header.metadata)
    except AdapterFormatError as e:
        raise type(e)(f"{f}: {e.message}", path=f, hint=e.hint) from None
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

    named, leftovers = group_keys(header.tensors, split)
    refuse_leftovers(leftovers, f)
    groups = load_groups(header, named, f)
    modules: dict[str, LoraModule] = {}
    for module, roles in sorted(groups.items()):
        if "A" not in roles or "B" not in roles:
            raise AdapterFormatError(f"{f}: {module} lacks its lora_A or lora_B.", path=f, tensor=module)
        (_, A), (_, B) = roles["A"], roles["B"]
        r = int(A.shape[0])
        component, rel = component_of(module)
        cfg = configs.get(component or "", {})
        if "alpha" in roles:
            alpha = float(roles["alpha"][1].reshape(-1)[0])
        elif cfg:
            akey = get_pattern_key(list(cfg.get("alpha_pattern") or {}), rel)
            alpha = float(cfg["alpha_pattern"][akey]) if akey is not None else float(cfg.get("lora_alpha", r))
        else:
            alpha = float(r)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        kernel = tuple(int(s) for s in A.shape[2:])
        modules[module + ".weight"] = lowrank_module(
            module + ".weight", A.reshape(r, -1), B.reshape(B.shape[0], r), scale, alpha, kind="conv" if kernel else "linear", transposed=False, kernel=kernel,
            magnitude=roles["magnitude"][1].reshape(-1) if "magnitude" in roles else None,
            bias=roles["bias"][1].reshape(-1) if "bias" in roles else None,
            bias_target=module + ".bias" if "bias" in roles else None,
            source_keys=tuple(k for k, _ in roles.values()),
        )
    added = header.metadata.get(ADDED_KEY)
    if added:  # written by loratools for targets without a component: give them their own names back
        modules = {n.removeprefix(added + "."): m.with_(target=n.removeprefix(added + "."),
                                                       bias_target=m.bias_target and m.bias_target.removeprefix(added + "."))
                   for n, m in modules.items()}
    return Adapter(modules=modules, meta={"format": NAME, "components": sorted(configs)}, path=path, files=[f])


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, base_config: dict | None = None,
          **_: object) -> list[Path]:
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
            tensors[f"{module}.lora_B.bias"] = m.bias.contiguous()
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
    save_tensors(out / WEIGHTS, tensors, file_meta)
    return [out / WEIGHTS]
