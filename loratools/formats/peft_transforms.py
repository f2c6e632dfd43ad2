"""PEFT's (IA)³ and OFT adapters (peft_type ``IA3`` / ``OFT``): changes that are functions of the
weight (``deltas.Scaling``, ``deltas.InputRotation``), read for merge, unmerge, swap and verify.

The facts (PEFT 0.21, ``peft/tuners/{ia3,oft}/layer.py``):

* **IA3** ``base_model.model.<module>.ia3_l``: the factor itself (initialised to 1), (out, 1) for a
  Linear, (1, in) for one of ``feedforward_modules`` (the inputs are scaled), (1, c, 1, 1) for a
  conv (outputs, or inputs when feed-forward). ``merge``: W ⊙ ia3_l, and for non-feed-forward
  modules the bias ⊙ ia3_l as well. ``fan_in_fan_out`` (GPT-2 ``Conv1D``) transposes it.
* Written (``convert --to peft``): an adapter whose modules are all (IA)³ becomes a PEFT IA3
  adapter — LyCORIS' factor − 1 stored as the factor (one rounding), ``on_input`` modules as
  ``feedforward_modules``; LyCORIS (IA)³ on outputs is refused, since PEFT's merge and forward
  scale the layer's bias as well and LyCORIS' do not.
* **OFT** ``base_model.model.<module>.oft_R.weight`` (blocks, b(b−1)/2): per block the upper
  triangle of a skew-symmetric Q; R = PEFT's Cayley–Neumann series of Q
  (``num_cayley_neumann_terms``, or the exact Cayley transform with ``use_cayley_neumann`` false);
  ``block_share``: one block for every input block; ``coft``: the vectors projected to norm ≤ eps
  first (what PEFT's forward does to them). ``merge``: W' = W · blockdiag(R)ᵀ over the layer's
  inputs (a conv's in·kh·kw).

* **BOFT** ``…<module>.boft_R`` (stages, blocks, b, b) and ``boft_s`` (out, 1) — (1, out) for a
  conv: W' = (W · Mᵀ) ⊙ boft_s over the inputs, M the product of the butterfly stages (each a
  permutation, a block-diagonal Cayley transform of (R − Rᵀ)/2, the permutation back), PEFT's
  ``BOFTLayer.get_delta_weight`` and ``block_butterfly_perm``.

Not read: OFT/BOFT on embeddings or with ``fan_in_fan_out``, ``modules_to_save`` beside these
types: refused by name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, LoraModule
from ..checkpoint.reader import load_state_dict
from ..checkpoint.safetensors_io import load_tensors, read_header, save_tensors
from ..deltas import InputButterfly, InputRotation, Scaling
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..jsonio import clip
from .common import check_factor, with_record

PREFIX = "base_model.model."
TYPES = ("IA3", "OFT", "BOFT")


def _matches(name: str, patterns: Any) -> bool:
    """PEFT's module matching: a string is a full-match regex, a list matches by suffix."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    if isinstance(patterns, list):
        return any(name == p or name.endswith("." + p) for p in patterns if isinstance(p, str))
    return False


def _project(v: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """PEFT's ``_project_batch`` (coft): each block's skew matrix held to Frobenius norm ≤ eps/√blocks."""
    rows, cols = torch.triu_indices(b, b, 1)
    Q = torch.zeros(v.shape[0], b, b, dtype=torch.float64)
    Q[:, rows, cols] = v.double()
    Q = Q - Q.transpose(-1, -2)
    eps = eps / math.sqrt(Q.shape[0])
    norm = torch.linalg.matrix_norm(Q, keepdim=True)
    out = torch.where(norm <= eps, Q, eps * (Q / norm))
    return out[:, rows, cols].to(v.dtype)


def read(path: Path, cfg: dict[str, Any], config_path: Path, weights: Path) -> Adapter:
    kind = str(cfg.get("peft_type", "")).upper()
    if weights.suffix == ".safetensors":
        header = read_header(weights)
        sd = load_tensors(list(header.tensors.values()))
    else:
        sd = load_state_dict(weights)
    if cfg.get("modules_to_save"):
        raise UnsupportedAdapterError(f"{config_path}: modules_to_save beside a PEFT {kind} adapter is not read yet.",
                                      path=config_path)
    if kind == "BOFT":
        return _read_boft(path, cfg, config_path, weights, sd)
    suffix = ".ia3_l" if kind == "IA3" else ".oft_R.weight"
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    modules: dict[str, LoraModule] = {}
    leftovers = []
    for key, t in sorted(sd.items()):
        if not key.startswith(PREFIX) or not key.endswith(suffix):
            leftovers.append(key)
            continue
        name = key[len(PREFIX):-len(suffix)]
        t = check_factor(t, key, weights)
        if kind == "IA3":
            ff = _matches(name, cfg.get("feedforward_modules"))
            if t.dim() == 2 and t.shape[0] != 1 and t.shape[1] != 1:
                raise AdapterFormatError(f"{weights}: {clip(key)} has shape {tuple(t.shape)}; (out, 1) or (1, in).",
                                         path=weights, tensor=key)
            if t.dim() == 2:
                ff = t.shape[0] == 1 and not (t.shape[1] == 1 and not ff)
            delta = Scaling(t, on_input=ff, offset=0.0, with_bias=not ff)
            modules[name + ".weight"] = LoraModule(target=name + ".weight", delta=delta, transposed=fan_in_fan_out,
                                                   source_keys=(key,))
        else:
            if fan_in_fan_out:
                raise UnsupportedAdapterError(f"{config_path}: PEFT OFT with fan_in_fan_out is not read yet.",
                                              path=config_path)
            n_el = int(t.shape[1]) if t.dim() == 2 else -1
            b = int(round((1 + math.sqrt(1 + 8 * n_el)) / 2)) if n_el > 0 else 0
            if t.dim() != 2 or b * (b - 1) // 2 != n_el:
                raise AdapterFormatError(f"{weights}: {clip(key)} has shape {tuple(t.shape)}; (blocks, b(b−1)/2).",
                                         path=weights, tensor=key)
            if cfg.get("coft"):
                t = _project(t, b, float(cfg.get("eps", 6e-5)))
            terms = int(cfg.get("num_cayley_neumann_terms", 5)) if cfg.get("use_cayley_neumann", True) else 0
            delta = InputRotation(t, block_size=b, terms=terms, block_share=bool(cfg.get("block_share")))
            modules[name + ".weight"] = LoraModule(target=name + ".weight", delta=delta, transposed=False,
                                                   source_keys=(key,))
    if leftovers:
        raise AdapterFormatError(
            f"{weights}: {len(leftovers)} key(s) are not PEFT {kind} tensors loratools reads: "
            f"{', '.join(clip(k) for k in leftovers[:6])}{' …' if len(leftovers) > 6 else ''}.", path=weights)
    if not modules:
        raise AdapterFormatError(f"{weights} holds no {kind} tensors.", path=weights)
    return Adapter(modules=modules, meta={"format": "peft", "config": cfg, "peft_type": kind,
                                          "base_model": cfg.get("base_model_name_or_path")},
                   path=path, files=[config_path, weights])


def _read_boft(path: Path, cfg: dict[str, Any], config_path: Path, weights: Path,
               sd: dict[str, torch.Tensor]) -> Adapter:
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedAdapterError(f"{config_path}: PEFT BOFT with fan_in_fan_out is not read yet.", path=config_path)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    leftovers = []
    for key, t in sorted(sd.items()):
        role = next((r for r in ("boft_R", "boft_s") if key.endswith("." + r)), None)
        if not key.startswith(PREFIX) or role is None:
            leftovers.append(key)
            continue
        groups.setdefault(key[len(PREFIX):-len(role) - 1], {})[role] = (key, check_factor(t, key, weights))
    if leftovers:
        raise AdapterFormatError(f"{weights}: {len(leftovers)} key(s) are not PEFT BOFT tensors loratools reads: "
                                 f"{', '.join(clip(k) for k in leftovers[:6])}.", path=weights)
    modules: dict[str, LoraModule] = {}
    for name, roles in groups.items():
        if set(roles) != {"boft_R", "boft_s"}:
            raise AdapterFormatError(f"{weights}: {clip(name)} needs both boft_R and boft_s.", path=weights, tensor=name)
        R, s = roles["boft_R"][1], roles["boft_s"][1]
        if R.dim() != 4 or R.shape[-1] != R.shape[-2] or R.shape[-1] % 2 or s.dim() != 2 or 1 not in s.shape:
            raise AdapterFormatError(f"{weights}: {clip(name)} has boft_R {tuple(R.shape)}, boft_s {tuple(s.shape)}: "
                                     "(stages, blocks, b, b) and (out, 1) are needed.", path=weights, tensor=name)
        modules[name + ".weight"] = LoraModule(target=name + ".weight", delta=InputButterfly(R, s), transposed=False,
                                               source_keys=(roles["boft_R"][0], roles["boft_s"][0]))
    if not modules:
        raise AdapterFormatError(f"{weights} holds no BOFT tensors.", path=weights)
    return Adapter(modules=modules, meta={"format": "peft", "config": cfg, "peft_type": "BOFT",
                                          "base_model": cfg.get("base_model_name_or_path")},
                   path=path, files=[config_path, weights])


def write_ia3(adapter: Adapter, out: Path, *, base_model: str | None, record: str | None, config_path: str,
              weights_name: str) -> list[Path]:
    """A PEFT IA3 adapter of (IA)³ modules (see the module docstring for what is refused)."""
    problems, tensors, feedforward = [], {}, []
    for target, m in sorted(adapter.modules.items()):
        d = m.delta
        if not isinstance(d, Scaling):
            problems.append(f"{target} ({d.kind})")
            continue
        if m.transposed or m.magnitude is not None or m.bias is not None:
            problems.append(f"{target} (stored (in, out), DoRA or a bias change)")
            continue
        if not d.on_input and not d.with_bias:
            problems.append(f"{target} (scales outputs without the bias; PEFT's IA3 scales the bias too)")
            continue
        name = target.removesuffix(".weight")
        factor = d.vector.reshape(-1)
        factor = factor if d.offset == 0.0 else (factor.double() + d.offset).to(factor.dtype)
        if m.kind == "conv":
            shape: tuple[int, ...] = (1, -1, *([1] * len(m.kernel)))
        else:
            shape = (1, -1) if d.on_input else (-1, 1)
        tensors[f"{PREFIX}{name}.ia3_l"] = factor.reshape(shape).contiguous()
        if d.on_input:
            feedforward.append(name)
    if problems or adapter.replacements:
        problems += [f"{n} (full tensor)" for n in sorted(adapter.replacements)]
        raise UnsupportedAdapterError(
            f"PEFT IA3 cannot hold {len(problems)} part(s): {'; '.join(problems[:6])}{' …' if len(problems) > 6 else ''}.",
            hint="convert --to kohya keeps LyCORIS (IA)³ modules as they are.")
    names = sorted(t.removesuffix(".weight") for t in adapter.modules)
    cfg = {"peft_type": "IA3", "base_model_name_or_path": base_model or adapter.meta.get("base_model"),
           "target_modules": names, "feedforward_modules": sorted(feedforward), "fan_in_fan_out": False,
           "init_ia3_weights": True, "inference_mode": True, "modules_to_save": None}
    (out / config_path).write_text(json.dumps(cfg, indent=2) + "\n")
    save_tensors(out / weights_name, tensors, with_record({"format": "pt"}, record))
    return [out / config_path, out / weights_name]
