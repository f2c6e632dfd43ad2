"""kohya sd-scripts / A1111 / ComfyUI / Forge LoRA files.

Keys are ``<prefix>_<module path with "." → "_">.{lora_down.weight, lora_up.weight, alpha,
dora_scale}`` with prefixes ``lora_unet``, ``lora_te`` (one text encoder), ``lora_te1`` /
``lora_te2`` (SDXL), ``lora_te3`` (T5). down is (r, in[, kh, kw]), up (out, r[, 1, 1]); scale =
alpha / r, a missing or zero alpha meaning alpha = r.

Flattening loses the dots (``to_q`` vs ``to.q``), so names are mapped back by flattening the
**base's** tensor names the same way (``layout.bind``), never by guessing. Files written by
loratools also carry the original names in their metadata (``loratools_targets``) so that they
read back without a base.

LyCORIS DoRA ``dora_scale`` is (out, 1) in new files — per output, like PEFT — and (1, in) in old
ones, where the norm is taken per input column instead; the axis is decided from the shape.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..adapter import Adapter, LoraModule, lowrank_module
from ..checkpoint.safetensors_io import read_header, save_tensors
from ..errors import AdapterFormatError, AdapterNotFoundError, CorruptFileError, UnsupportedAdapterError
from ..jsonio import clip, load_json
from .common import (alpha_of, check_rank, check_scale, component_of, default_component, fold_scale, load_groups,
                     lowrank, most_common, scalar, with_record)
from . import lycoris
from .keys import group_keys

NAME = "kohya"
PREFIXES: dict[str, str | None] = {  # kohya prefix → diffusers component
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    "lora_te3": "text_encoder_3",
    "lora_transformer": "transformer",
    "lycoris": None,  # LyCORIS' wrapper on any model: the model's own module path
}
SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".dora_scale": "dora",
            **lycoris.SUFFIXES}
# keys of other LyCORIS / kohya network types: recognised so they can be named, not applied
UNSUPPORTED = (".lora_mid.weight", ".oft_diag", ".w_norm", ".b_norm", ".a1.weight", ".a2.weight", ".b1.weight",
               ".b2.weight")
TARGETS_KEY = "loratools_targets"


def _file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.glob("*.safetensors"))
    if len(files) != 1:
        raise AdapterNotFoundError(f"{path}: expected one .safetensors LoRA file, found {len(files)}.", path=path)
    return files[0]


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in SUFFIXES.items():
        if key.endswith(suffix) and "." not in key[: -len(suffix)]:  # kohya stems have no dots
            return key[: -len(suffix)], role
    return None


def _candidate(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix == ".safetensors" else None
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return files[0] if len(files) == 1 else None


def detect(path: Path) -> bool:
    """Yes: kohya-prefixed keys. A .safetensors whose header is broken raises CorruptFileError here
    (the first safetensors reader in the table): it is a broken file, not "not an adapter"."""
    f = _candidate(path)
    if f is None:
        return False
    names = list(read_header(f).tensors)
    return any(_prefixed(n.split(".")[0]) and (_split(n) or n.endswith(UNSUPPORTED)) for n in names)


def _prefixed(stem: str) -> bool:
    return any(stem.startswith(prefix + "_") for prefix in PREFIXES)


def split_stem(stem: str) -> tuple[str | None, str]:
    """('unet', 'down_blocks_0_…') for 'lora_unet_down_blocks_0_…' (longest prefix first)."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return PREFIXES[prefix], stem[len(prefix) + 1:]
    return None, stem


def _targets(header_metadata: dict[str, str], f: Path) -> dict[str, str]:
    """loratools' own record of the original module names (absent in files of other tools)."""
    targets = load_json(header_metadata.get(TARGETS_KEY, "{}"), where=f, what=f"metadata {TARGETS_KEY}")
    bad = next((k for k, v in targets.items() if not (isinstance(v, str) and v.endswith(".weight"))), None)
    if bad is not None:
        raise CorruptFileError(f"{f}: metadata {TARGETS_KEY} must map kohya names to tensor names (….weight); "
                               f"{clip(bad)} maps to {clip(repr(targets[bad]), 60)}.", path=f)
    return targets


def read(path: Path, *, allow_skip: bool = False, **_: object) -> Adapter:
    f = _file(path)
    header = read_header(f)
    targets = _targets(header.metadata, f)
    named, others = group_keys(header.tensors, _split, path=f)
    groups = load_groups(header, named, f, integer_roles=frozenset({"alpha", "on_input"}))
    unsupported = [k for k in others if k.endswith(UNSUPPORTED)]
    leftovers = [k for k in others if not k.endswith(UNSUPPORTED)]
    for stem, roles in groups.items():
        if not _applicable(roles):
            if any(k.startswith(stem + ".") and k.endswith(UNSUPPORTED) for k in unsupported):
                continue
            leftovers.extend(k for k, _ in roles.values())
    warnings: list[str] = []
    if unsupported or leftovers:
        names = sorted(unsupported + leftovers)
        msg = (f"{f}: {len(names)} key(s) are not modules loratools can apply (LoRA, LoHa, LoKr and full diffs are; "
               f"lora_mid, (IA)³, OFT/BOFT, GLoRA, norms are not yet): "
               f"{', '.join(clip(n) for n in names[:8])}{' …' if len(names) > 8 else ''}.")
        if not allow_skip:
            raise AdapterFormatError(msg, path=f, hint="Nothing was written. --allow-skip applies the rest and reports "
                                     "what was left out.")
        warnings.append("skipped " + msg)
    modules: dict[str, LoraModule] = {}
    for stem, roles in sorted(groups.items()):
        if not _applicable(roles):
            continue
        target, module = _module(f, stem, roles, targets)
        if target in modules:
            raise AdapterFormatError(f"{f}: two kohya modules name the same target {clip(target)}.", path=f,
                                     tensor=target)
        modules[target] = module
    if not modules:
        raise AdapterFormatError(f"{f} holds no lora_down / lora_up pairs and no LyCORIS module.", path=f)
    meta = dict(header.metadata)
    return Adapter(
        modules=modules,
        meta={"format": NAME, "flat_names": not targets, "base_model": meta.get("ss_sd_model_name"),
              **({"kohya_prefix": "lycoris"} if all(s.startswith("lycoris_") for s in groups) else {}),
              "metadata": {k: v for k, v in meta.items() if k.startswith("ss_")}},
        warnings=warnings, path=path, files=[f],
    )


def _applicable(roles: dict[str, tuple[str, torch.Tensor]]) -> bool:
    """A group that forms a module: a down/up pair or a LyCORIS kind."""
    return ("down" in roles and "up" in roles) or lycoris.kind_of(roles) is not None


def _magnitude(f: Path, stem: str, d: torch.Tensor, fan_out: int, fan_in: int = -1) -> tuple[torch.Tensor, bool]:
    """DoRA's ``dora_scale``: (out, 1[, 1, 1]) per output, (1, in[, 1, 1]) per input (old LyCORIS);
    a flat vector only where its length tells (``fan_in``: input channels)."""
    shape = tuple(int(s) for s in d.shape)
    if len(shape) >= 2 and shape[0] == fan_out and all(s == 1 for s in shape[1:]):
        return d.reshape(-1), False
    if len(shape) >= 2 and shape[0] == 1 and all(s == 1 for s in shape[2:]):
        return d.reshape(-1), True
    if len(shape) == 1 and shape[0] == fan_out and fan_out != fan_in:
        return d, False
    if len(shape) == 1 and shape[0] == fan_in and fan_out != fan_in:
        return d, True
    raise AdapterFormatError(f"{f}: {clip(stem)}.dora_scale has shape {shape}: neither (out, 1) nor (1, in)"
                             + (" (a flat vector on a square module does not say which)" if len(shape) == 1 else "")
                             + ".", path=f, tensor=stem)


def _module(f: Path, stem: str, roles: dict[str, tuple[str, torch.Tensor]], targets: dict[str, str]) -> tuple[
        str, LoraModule]:
    """One module: a down/up pair or a LyCORIS kind, with its alpha and DoRA scale."""
    component, flat = split_stem(stem)
    target = targets.get(stem) or f"{component + ':' if component else ''}{flat}"
    kind = lycoris.kind_of(roles)
    if kind is not None and ("down" in roles or "up" in roles) and kind != "full":
        raise AdapterFormatError(f"{f}: {clip(stem)} holds both lora_down/lora_up and {kind} keys.", path=f,
                                 tensor=stem)
    if kind is not None and "down" not in roles:
        alpha = scalar(roles["alpha"][1], roles["alpha"][0], f) if "alpha" in roles else None
        if alpha is not None:
            check_scale(f, stem, alpha, what="alpha")
        delta, kernel, bias = lycoris.build(f, stem, roles, alpha)
        if delta is None:
            raise AdapterFormatError(f"{f}: {clip(stem)} holds only a bias change (diff_b) and no weight change; "
                                     "loratools does not read those yet.", path=f, tensor=stem)
        in_ch = delta.in_features // max(1, math.prod(kernel)) if getattr(delta, "additive", True) else -1
        magnitude, per_input = _magnitude(f, stem, roles["dora"][1], delta.out_features, in_ch) if "dora" in roles \
            else (None, False)
        return target, LoraModule(
            target=target, delta=delta, kind="conv" if kernel else "linear", transposed=False, kernel=kernel,
            magnitude=magnitude, dora_per_input=per_input, bias=bias, bias_scale=None if bias is None else 1.0,
            bias_target=None, source_keys=tuple(k for k, _ in roles.values()))
    (_, down), (uk, up) = roles["down"], roles["up"]
    r = check_rank(f, stem, tuple(down.shape), tuple(up.shape), what="lora_down / lora_up")
    if int(up.shape[1]) != r:
        raise AdapterFormatError(f"{f}: {clip(stem)} has rank {r} in lora_down and {up.shape[1]} in lora_up.",
                                 path=f, tensor=stem)
    if any(int(s) != 1 for s in up.shape[2:]):
        raise UnsupportedAdapterError(f"{f}: {clip(uk)} has a {tuple(up.shape[2:])} kernel; only 1×1 lora_up is a "
                                      "plain low-rank delta (is this a LoCon with lora_mid?).", path=f)
    alpha = scalar(roles["alpha"][1], roles["alpha"][0], f) if "alpha" in roles else 0.0
    if alpha == 0.0:
        alpha = float(r)  # kohya: a missing or zero alpha means alpha = rank
    check_scale(f, stem, alpha, what="alpha")
    kernel = tuple(int(s) for s in down.shape[2:])
    magnitude, per_input = _magnitude(f, stem, roles["dora"][1], int(up.shape[0]), int(down.shape[1])) \
        if "dora" in roles else (None, False)
    bias = lycoris.bias_change(f, stem, roles)
    if "diff" in roles:
        raise AdapterFormatError(f"{f}: {clip(stem)} holds both lora_down/lora_up and a full diff.", path=f,
                                 tensor=stem)
    return target, lowrank_module(
        target, down.reshape(r, -1), up.reshape(up.shape[0], r), alpha / r, alpha,
        kind="conv" if kernel else "linear", transposed=False, kernel=kernel, magnitude=magnitude,
        dora_per_input=per_input, bias=bias, bias_scale=None if bias is None else 1.0,
        source_keys=tuple(k for k, _ in roles.values()),
    )


def _dora_scale(m: LoraModule) -> torch.Tensor:
    """(out, 1[, 1, 1]) per output, (1, in[, 1, 1]) per input — conv magnitudes keep the kernel's axes."""
    extra = [1] * len(m.kernel)
    shape = [1, -1, *extra] if m.dora_per_input else [-1, 1, *extra]
    return m.magnitude.reshape(shape).contiguous()


def stem_for(target: str, components: set[str | None], default: str = "unet", plain: str | None = None) -> str:
    """The kohya name of ``target``; ``plain``: the prefix for names without a component (LyCORIS'
    own ``lycoris`` when the source used it)."""
    component, rest = component_of(target.removesuffix(".weight"))
    if component is None and plain:
        return f"{plain}_{rest.replace('.', '_')}"
    component = component or default
    if component == "text_encoder":
        prefix = "lora_te1" if "text_encoder_2" in components else "lora_te"
    else:
        prefix = next(p for p, c in PREFIXES.items() if c == component and p != "lora_te1")
    return f"{prefix}_{rest.replace('.', '_')}"


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, base_config: dict | None = None,
          record: str | None = None, **_: object) -> list[Path]:
    """One ``pytorch_lora_weights``-style kohya file, real alphas, the original names in metadata."""
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, str] = {}
    components = {component_of(t)[0] for t in adapter.modules}
    default = default_component(base_config)
    for target, m in sorted(adapter.modules.items()):
        if m.delta.kind == "lowrank" and alpha_of(m) == 0.0:  # kohya reads alpha 0 as alpha = rank: a zero scale goes into B instead
            m = fold_scale(m, 1.0)
        stem = stem_for(target, components, default, adapter.meta.get("kohya_prefix"))
        if stem in targets:
            raise UnsupportedAdapterError(f"{target} and {targets[stem]} flatten to the same kohya name {stem}.")
        targets[stem] = target
        if m.delta.kind != "lowrank":
            tensors.update(lycoris.tensors(stem, m))
            if m.magnitude is not None:
                tensors[f"{stem}.dora_scale"] = _dora_scale(m)
            if m.bias is not None:
                tensors[f"{stem}.diff_b"] = lycoris.bias_tensor(m)
            continue
        d = lowrank(m)
        r = d.rank
        tensors[f"{stem}.lora_down.weight"] = d.A.reshape(r, -1, *m.kernel).contiguous()
        tensors[f"{stem}.lora_up.weight"] = d.B.reshape(m.fan_out, r, *([1] * len(m.kernel))).contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha_of(m), dtype=torch.float32)
        if m.magnitude is not None:
            tensors[f"{stem}.dora_scale"] = _dora_scale(m)
        if m.bias is not None:
            tensors[f"{stem}.diff_b"] = lycoris.bias_tensor(m)
    plain = [m for m in adapter.modules.values() if m.delta.kind == "lowrank"]
    ranks = [m.rank for m in plain] or [m.rank or 1 for m in adapter.modules.values()]
    alphas = [alpha_of(m) for m in plain] or [1.0]
    kinds = sorted({m.delta.kind for m in adapter.modules.values()} - {"lowrank"})
    meta = {
        "ss_network_module": "lycoris.kohya" if kinds else "networks.lora",
        **({"ss_network_args": json.dumps({"algo": kinds[0]})} if len(kinds) == 1 else {}),
        "ss_network_dim": str(most_common(ranks)),
        "ss_network_alpha": str(most_common(alphas)),
        TARGETS_KEY: json.dumps(targets, separators=(",", ":")),
        "format": "pt",
    }
    name = "pytorch_lora_weights.safetensors"
    save_tensors(out / name, tensors, with_record(meta, record))
    return [out / name]
