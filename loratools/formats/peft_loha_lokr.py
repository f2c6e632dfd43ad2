"""PEFT's LoHa and LoKr adapters (peft_type ``LOHA`` / ``LOKR``), read and written.

PEFT 0.21 (``peft/tuners/{loha,lokr}/layer.py``) stores the same tensors as LyCORIS, under
``base_model.model.<module>.{hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2}`` and
``…{lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2}`` with LyCORIS' shapes
(``formats/lycoris.py``: Tucker for convs with ``use_effective_conv2d``, flattened conv factors
otherwise). The scale differs in one place: PEFT's is ``alpha / r`` with r and alpha from the config
(``r`` / ``alpha``, per module through ``rank_pattern`` / ``alpha_pattern``, PEFT's first match)
for every module — a LoKr whose halves are both whole keeps alpha / r there, where LyCORIS uses 1.

Writing: PEFT re-creates every module from the config before loading the tensors, so a module is
written only when the shapes PEFT would create for its r, ``decompose_both``,
``decompose_factor`` and ``use_effective_conv2d`` are the module's own; the others are refused by
name. One adapter holds one kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, LoraModule
from ..checkpoint.reader import load_state_dict
from ..checkpoint.safetensors_io import load_tensors, read_header, save_tensors
from ..deltas import Hadamard, Kronecker
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..jsonio import clip
from . import lycoris
from .common import check_factor, check_scale, rank_alpha_patterns, with_record
from .patterns import first_match, pattern_keys

PREFIX = "base_model.model."
TYPES = ("LOHA", "LOKR")
ROLES = {"LOHA": lycoris.LOHA, "LOKR": lycoris.LOKR}


def _split(key: str, roles: tuple[str, ...]) -> tuple[str, str] | None:
    if not key.startswith(PREFIX):
        return None
    name, _, role = key[len(PREFIX):].rpartition(".")
    return (name, role) if role in roles and name else None


def read(path: Path, cfg: dict[str, Any], config_path: Path, weights: Path) -> Adapter:
    kind = str(cfg.get("peft_type", "")).upper()
    if weights.suffix == ".safetensors":
        sd = load_tensors(list(read_header(weights).tensors.values()))
    else:
        sd = load_state_dict(weights)
    if cfg.get("modules_to_save"):
        raise UnsupportedAdapterError(f"{config_path}: modules_to_save beside a PEFT {kind} adapter is not read yet.",
                                      path=config_path)
    r_cfg, alpha_cfg = cfg.get("r", 8), cfg.get("alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if not isinstance(r_cfg, int) or isinstance(r_cfg, bool) or r_cfg <= 0 or not isinstance(
            alpha_cfg, (int, float)) or not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterFormatError(f"{config_path}: r, alpha, rank_pattern or alpha_pattern is not valid.",
                                 path=config_path)
    rkeys = pattern_keys(list(rank_pattern), where=config_path, what="rank_pattern")
    akeys = pattern_keys(list(alpha_pattern), where=config_path, what="alpha_pattern")
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    leftovers = []
    for key, t in sorted(sd.items()):
        parts = _split(key, ROLES[kind])
        if parts is None:
            leftovers.append(key)
            continue
        groups.setdefault(parts[0], {})[parts[1]] = (key, check_factor(t, key, weights))
    if leftovers:
        raise AdapterFormatError(
            f"{weights}: {len(leftovers)} key(s) are not PEFT {kind} tensors loratools reads: "
            f"{', '.join(clip(k) for k in leftovers[:6])}{' …' if len(leftovers) > 6 else ''}.", path=weights)
    modules: dict[str, LoraModule] = {}
    for name, roles in groups.items():
        rkey, akey = first_match(rkeys, name), first_match(akeys, name)
        r = int(rank_pattern[rkey]) if rkey is not None else r_cfg
        alpha = float(alpha_pattern[akey]) if akey is not None else float(alpha_cfg)
        check_scale(weights, name, alpha, what="alpha")
        delta, kernel, _ = lycoris.build(weights, name, roles, alpha)
        if delta is None:
            raise AdapterFormatError(f"{weights}: {clip(name)} holds no weight change.", path=weights, tensor=name)
        if isinstance(delta, (Hadamard, Kronecker)):  # PEFT: alpha / r from the config, always
            if delta.rank is not None and delta.rank != r:
                raise AdapterFormatError(f"{weights}: {clip(name)} has rank {delta.rank}, the config says r = {r}.",
                                         path=weights, tensor=name)
            delta = type(delta)(delta.W1, delta.W2, alpha / r, alpha)
        modules[name + ".weight"] = LoraModule(target=name + ".weight", delta=delta, transposed=False,
                                               kind="conv" if kernel else "linear", kernel=kernel,
                                               source_keys=tuple(k for k, _ in roles.values()))
    if not modules:
        raise AdapterFormatError(f"{weights} holds no {kind} tensors.", path=weights)
    return Adapter(modules=modules, meta={"format": "peft", "config": cfg, "peft_type": kind,
                                          "base_model": cfg.get("base_model_name_or_path")},
                   path=path, files=[config_path, weights])


# --- writing ---------------------------------------------------------------------------------------


def kind_of(adapter: Adapter) -> str | None:
    """LOHA / LOKR / IA3 when every module is of that kind, None for plain LoRA; mixed kinds are refused."""
    kinds = {m.delta.kind for m in adapter.modules.values()}
    if kinds <= {"lowrank"}:
        return None
    if kinds == {"loha"}:
        return "LOHA"
    if kinds == {"lokr"}:
        return "LOKR"
    if kinds == {"ia3"}:
        return "IA3"
    listing = ", ".join(f"{clip(n)} ({m.delta.kind})" for n, m in sorted(adapter.modules.items())[:6])
    raise UnsupportedAdapterError(
        f"a PEFT adapter holds one kind of module; this one mixes {', '.join(sorted(kinds))}: {listing}.",
        hint="Convert to kohya (which holds every LyCORIS kind per module), or use --to-lora --rank R for plain LoRA.")


def _factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``lokr.layer.factorization``: (factor, dimension / factor) when ``factor`` divides it —
    unlike LyCORIS' copy, not swapped to put the smaller first —, else (m, n), m ≤ n, m nearest the
    square root (or ``factor``)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _lokr_layouts(m: LoraModule, d: Kronecker) -> list[tuple[dict[str, Any], int, float]]:
    """Every LoKr config that makes PEFT create exactly ``d``'s tensors, with its r and alpha."""
    found = []
    out_dim, in_ch = m.fan_out, m.fan_in // max(1, _prod(m.kernel))
    candidates = [-1] + sorted({d.W1.rows_n, d.W1.cols_n} - {0})
    for factor in candidates:
        out_l, out_k = _factorization(out_dim, factor)
        in_m, in_n = _factorization(in_ch, factor)
        if (out_l, in_m) != (d.W1.rows_n, d.W1.cols_n) or (out_k, in_n * _prod(m.kernel)) != (
                d.W2.rows_n, d.W2.cols_n):
            continue
        r = d.rank or max(1, int(max(out_k, in_n)))  # both whole: any r ≥ max/2 keeps w2 whole
        decompose_both = d.W1.down is not None
        use_w2 = d.W2.down is None
        if use_w2 != (r >= max(out_k, in_n) / 2):
            continue
        if decompose_both and not r < max(out_l, in_m) / 2:
            continue
        if m.kernel and d.W2.core is not None and len(m.kernel) == 2 and m.kernel == (1, 1):
            continue
        settings = {"decompose_both": decompose_both, "decompose_factor": factor}
        if m.kernel and any(k != 1 for k in m.kernel):  # PEFT applies use_effective_conv2d to these only
            settings["use_effective_conv2d"] = d.W2.core is not None
        found.append((settings, r, float(d.scale) * r))
    return found


def _prod(k: tuple[int, ...]) -> int:
    n = 1
    for v in k:
        n *= int(v)
    return n


def write(adapter: Adapter, out: Path, kind: str, *, base_model: str | None, record: str | None,
          config_path: str, weights_name: str) -> list[Path]:
    if adapter.replacements:
        raise UnsupportedAdapterError("full tensors (modules_to_save) beside a LoHa/LoKr adapter are not written.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    global_settings: dict[str, Any] | None = None
    problems: list[str] = []
    options = {t: _lokr_layouts(m, m.delta) for t, m in adapter.modules.items() if isinstance(m.delta, Kronecker)}
    for candidate in (x[0] for opts in options.values() for x in opts):  # one setting that fits every module
        if all(any(all(candidate.get(k, v) == v for k, v in x[0].items()) for x in opts) for opts in options.values()):
            global_settings = dict(candidate)
            break
    for target, m in sorted(adapter.modules.items()):
        d = m.delta
        if m.magnitude is not None or m.bias is not None or m.transposed:
            problems.append(f"{target} (DoRA, bias or transposed storage)")
            continue
        name = target.removesuffix(".weight")
        if isinstance(d, Hadamard):
            tucker = d.W1.core is not None
            settings = {"use_effective_conv2d": tucker} if m.kernel and m.kernel != (1, 1) else {}
            r = int(d.rank or 1)
            alpha = float(d.scale) * r
            tensors.update(lycoris.halves(PREFIX + name, d))
        elif isinstance(d, Kronecker):
            layouts = [x for x in options[target] if global_settings is None
                       or all(global_settings.get(k, v) == v for k, v in x[0].items())]
            layouts += [x for x in options[target] if x not in layouts]  # reported below if they conflict
            if not layouts:
                problems.append(f"{target}: no PEFT LoKr configuration creates factors of these shapes "
                                f"({tuple(d.W1.up.shape)}, {tuple(d.W2.up.shape)}…)")
                continue
            settings, r, alpha = layouts[0]
            tensors.update(lycoris.halves(PREFIX + name, d))
        else:
            problems.append(f"{target} ({d.kind})")
            continue
        if settings:
            if global_settings is not None and any(global_settings.get(k, v) != v for k, v in settings.items()):
                problems.append(f"{target} (needs {settings}, another module {global_settings}: PEFT has one setting)")
                continue
            global_settings = {**(global_settings or {}), **settings}
        ranks[name], alphas[name] = r, alpha
    if problems:
        raise UnsupportedAdapterError(
            f"PEFT {kind} cannot hold {len(problems)} module(s) as they are: {'; '.join(problems[:6])}"
            f"{' …' if len(problems) > 6 else ''}.",
            hint="convert --to kohya keeps every LyCORIS module as it is.")
    cfg = {
        "peft_type": kind,
        "base_model_name_or_path": base_model or adapter.meta.get("base_model"),
        **rank_alpha_patterns(ranks, alphas, alpha_key="alpha"),
        "target_modules": sorted(ranks),
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "init_weights": True,
        "inference_mode": True,
        **(global_settings or {}),
    }
    (out / config_path).write_text(json.dumps(cfg, indent=2) + "\n")
    save_tensors(out / weights_name, {k: v.contiguous() for k, v in tensors.items()}, with_record({"format": "pt"}, record))
    return [out / config_path, out / weights_name]
