"""MLX-LM adapters: ``adapters.safetensors`` + ``adapter_config.json``.

Keys are module paths (``model.layers.0.self_attn.q_proj.lora_a``) with ``lora_a`` (in, r) and
``lora_b`` (r, out); MLX-LM's LoRALinear computes y = x Wᵀ + scale · (x @ lora_a) @ lora_b, so
ΔW = scale · (lora_a @ lora_b)ᵀ with ``lora_parameters.scale`` an absolute factor (PEFT alpha =
scale · r). Embeddings (LoRAEmbedding): lora_a (vocab, r), lora_b (r, dim), ΔW = scale · a @ b.
DoRA (``fine_tune_type: dora``) adds ``m`` (out,), normalised per output row.

MLX has one rank and one scale for the whole adapter: writing folds each module's scale into B
(the most common scale becomes the config's) and pads smaller ranks with zero rows/columns, which
keeps every ΔW exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..adapter import Adapter, lowrank_module
from ..checkpoint.safetensors_io import read_header, save_tensors
from ..errors import AdapterFormatError, AdapterNotFoundError, UnsupportedAdapterError
from ..jsonio import clip, get_field, read_json
from .common import check_rank, check_scale, fold_scale, load_groups, lowrank, most_common, pad_rank, with_record
from .keys import group_keys, refuse_leftovers

NAME = "mlx"
CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embedding")


def detect(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        return False
    cfg = read_json(folder / CONFIG, what="the adapter config")
    return "peft_type" not in cfg and ("lora_parameters" in cfg or "fine_tune_type" in cfg)


def read(path: Path, **_: object) -> Adapter:
    folder = path if path.is_dir() else path.parent
    if not (folder / WEIGHTS).is_file():
        raise AdapterNotFoundError(f"{folder} has no {WEIGHTS}.", path=folder)
    config = folder / CONFIG
    cfg = read_json(config, what="the adapter config")
    kind = get_field(cfg, "fine_tune_type", str, "lora", where=config)
    if kind not in ("lora", "dora"):
        raise UnsupportedAdapterError(f"{folder}: fine_tune_type {clip(repr(kind))} is not a LoRA adapter.",
                                      path=folder)
    params = get_field(cfg, "lora_parameters", dict, {}, where=config)
    scale = get_field(params, "scale", float, 20.0, where=config, what="lora_parameters",  # mlx-lm's default
                      must="a finite number")
    base_model = get_field(cfg, "model", str, None, where=config)
    header = read_header(folder / WEIGHTS)
    named, leftovers = group_keys(header.tensors, {".lora_a": "lora_a", ".lora_b": "lora_b", ".m": "m"},
                                  path=folder / WEIGHTS)
    refuse_leftovers(leftovers, folder / WEIGHTS)
    groups = load_groups(header, named, folder / WEIGHTS)
    modules = {}
    for module, roles in sorted(groups.items()):
        if "lora_a" not in roles or "lora_b" not in roles:
            raise AdapterFormatError(f"{folder}: {clip(module)} lacks lora_a or lora_b.", path=folder, tensor=module)
        a, b = roles["lora_a"][1], roles["lora_b"][1]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterFormatError(f"{folder / WEIGHTS}: {clip(module)} has lora_a {tuple(a.shape)} and lora_b "
                                     f"{tuple(b.shape)}; MLX factors are matrices.", path=folder / WEIGHTS,
                                     tensor=module)
        r = check_rank(folder / WEIGHTS, module, tuple(a.shape), tuple(b.shape), rank_axis=1,
                       what="lora_a / lora_b")
        if int(b.shape[0]) != r:
            raise AdapterFormatError(f"{folder / WEIGHTS}: {clip(module)} has rank {r} in lora_a and {b.shape[0]} in "
                                     "lora_b.", path=folder / WEIGHTS, tensor=module)
        check_scale(folder / CONFIG, module, scale * r, what="alpha (lora_parameters scale × rank)")
        emb = module.rsplit(".", 1)[-1] in EMBEDDINGS
        target = module + ".weight"
        modules[target] = lowrank_module(
            target, a.T.contiguous(), b.T.contiguous(), scale, scale * r, kind="embedding" if emb else "linear", transposed=True if emb else False,
            magnitude=roles["m"][1].reshape(-1) if "m" in roles else None,
            source_keys=tuple(k for k, _ in roles.values()),
        )
    if not modules:
        raise AdapterFormatError(f"{folder / WEIGHTS} holds no lora_a / lora_b pairs.", path=folder / WEIGHTS)
    return Adapter(modules=modules, meta={"format": NAME, "config": cfg, "base_model": base_model},
                   path=path, files=[folder / CONFIG, folder / WEIGHTS])


def _hub_id(value: object) -> str | None:
    """The base's Hub id for ``model`` (mlx-lm fetches it by that name); a local path is left out
    of files loratools writes (it names a user's folders and means nothing elsewhere)."""
    if isinstance(value, str) and value.count("/") == 1 and not value.startswith((".", "/", "~")) \
            and not Path(value).exists():
        return value
    return None


def write(adapter: Adapter, out: Path, *, base_model: str | None = None, base_config: dict | None = None,
          record: str | None = None, **_: object) -> list[Path]:
    """``adapter_config.json`` + ``adapters.safetensors`` as mlx-lm's ``load_adapters`` wants them.

    mlx-lm turns the modules named in ``lora_parameters.keys`` into LoRA layers — paths relative
    to a transformer block for the last ``num_layers`` blocks, full paths (``model.embed_tokens``,
    ``lm_head``) for the rest of the model — and then refuses any tensor that has no such layer.
    So every adapted path is in ``keys``, and ``num_layers`` reaches back to the lowest adapted
    block: the number of blocks minus its index when the base's config says how many there are,
    else -1 (all blocks; blocks without weights in the file get LoRA layers whose B is zero)."""
    mods = adapter.modules
    scale = float(most_common([m.scale for m in mods.values()])) if mods else 20.0
    rank = max((m.rank for m in mods.values()), default=8)
    tensors: dict[str, torch.Tensor] = {}
    keys: set[str] = set()
    layers: set[int] = set()
    for target, m in sorted(mods.items()):
        m = pad_rank(fold_scale(m, scale), rank)
        module = target.removesuffix(".weight")
        d = lowrank(m)
        tensors[f"{module}.lora_a"] = d.A.T.contiguous()
        tensors[f"{module}.lora_b"] = d.B.T.contiguous()
        if m.magnitude is not None:
            tensors[f"{module}.m"] = m.magnitude.contiguous()
        parts = module.split(".")
        i = parts.index("layers") if "layers" in parts else -1
        if i >= 0 and i + 2 <= len(parts) and parts[i + 1].isdigit():
            layers.add(int(parts[i + 1]))
            keys.add(".".join(parts[i + 2:]))
        else:
            keys.add(module)  # outside the blocks (embeddings, lm_head): mlx-lm matches the full path
    total = (base_config or {}).get("num_hidden_layers")
    if not layers:
        num_layers = 0
    elif isinstance(total, int) and not isinstance(total, bool) and total > max(layers):
        num_layers = total - min(layers)
    else:
        num_layers = -1
    cfg = {
        "fine_tune_type": "dora" if any(m.magnitude is not None for m in mods.values()) else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
        "model": _hub_id(base_model or adapter.meta.get("base_model")),
    }
    (out / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    save_tensors(out / WEIGHTS, tensors, with_record({"format": "mlx"}, record))
    return [out / CONFIG, out / WEIGHTS]
