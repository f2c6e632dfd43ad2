"""ComfyUI / BFL native names: the module path with its dots, under ComfyUI's model prefixes.

ComfyUI's LoRA and model-diff savers (``comfy_extras/nodes_lora_extract.py``) and BFL's own Flux
LoRAs write ``diffusion_model.<module path>.<role>`` (and ``text_encoders.<name>.<path>.<role>``
for text encoders): the same roles as kohya/LyCORIS files (``lora_up.weight`` / ``lora_down.weight``
or ``lora_B.weight`` / ``lora_A.weight``, ``alpha``, ``dora_scale``, ``diff``, ``diff_b``,
``hada_*``, ``lokr_*``, …) but the names keep their dots, so they are bound to the base by
suffix (``model.diffusion_model.…`` and bare ``double_blocks.…`` checkpoints alike) instead of
being un-flattened. scale = alpha / r as ComfyUI applies it (a missing or zero alpha: r); before
this reader such files were taken for raw factor pairs and their ``alpha`` was ignored.
"""

from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter, LoraModule
from ..checkpoint.safetensors_io import read_header
from ..errors import AdapterFormatError
from ..jsonio import clip
from . import kohya
from .common import load_groups
from .keys import group_keys

NAME = "comfy"
PREFIXES = ("diffusion_model.", "text_encoders.")
SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", **kohya.SUFFIXES}
ORDERED = sorted(SUFFIXES, key=len, reverse=True)  # ".lora_A.weight" before ".weight"


def _split(key: str) -> tuple[str, str] | None:
    if not key.startswith(PREFIXES):
        return None
    for suffix in ORDERED:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


def detect(path: Path) -> bool:
    f = kohya._candidate(path)
    if f is None:
        return False
    names = list(read_header(f).tensors)
    claimed = [n for n in names if _split(n)]
    return bool(claimed) and any(r in ("down", "up", "diff") or r.startswith(("hada_", "lokr_", "oft_"))
                                 for _, r in (_split(n) for n in claimed))


def read(path: Path, **_: object) -> Adapter:
    f = kohya._file(path)
    header = read_header(f)
    named, others = group_keys(header.tensors, _split, path=f)
    if others:
        raise AdapterFormatError(
            f"{f}: {len(others)} key(s) are not ComfyUI LoRA / LyCORIS roles under {' or '.join(PREFIXES)}: "
            f"{', '.join(clip(k) for k in sorted(others)[:8])}{' …' if len(others) > 8 else ''}.", path=f)
    groups = load_groups(header, named, f, integer_roles=frozenset({"alpha", "on_input"}))
    modules: dict[str, LoraModule] = {}
    for stem, roles in sorted(groups.items()):
        if not kohya._applicable(roles):
            raise AdapterFormatError(f"{f}: {clip(stem)} holds {', '.join(sorted(roles))} but no module "
                                     "(a lora_up/lora_down pair or a LyCORIS kind).", path=f, tensor=stem)
        target, module = kohya._module(f, stem, roles, {stem: stem + ".weight"})
        modules[target] = module
    if not modules:
        raise AdapterFormatError(f"{f} holds no modules.", path=f)
    return Adapter(modules=modules, meta={"format": NAME, "metadata": dict(header.metadata)}, warnings=[],
                   path=path, files=[f])
