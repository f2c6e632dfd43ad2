"""XLabs Flux LoRAs (x-flux): ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight``.

XLabs trains LoRA "processors" on Flux's double blocks, in BFL's own layout (the one of
``flux1-dev.safetensors`` and ComfyUI): ``qkv_lora1`` on the image stream's fused
``img_attn.qkv``, ``proj_lora1`` on ``img_attn.proj``, ``qkv_lora2`` / ``proj_lora2`` on the text
stream's ``txt_attn.qkv`` / ``txt_attn.proj`` (diffusers' ``_convert_xlabs_flux_lora_to_diffusers``
maps the same keys, splitting each qkv up-matrix by rows into to_q/to_k/to_v). down is (r, in), up
(out, r); the files carry no alpha and XLabs applies ΔW = up @ down (scale 1). The targets are BFL
names: such a file binds to a BFL-layout checkpoint (``double_blocks.…``, with or without
``model.diffusion_model.``) and, through ``loratools/flux.py``, to a diffusers-layout folder.
Single-block processors are refused by name.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..adapter import Adapter, LoraModule, lowrank_module
from ..checkpoint.safetensors_io import read_header
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..jsonio import clip
from . import kohya
from .common import check_rank, load_groups
from .keys import group_keys

NAME = "xlabs"
KEY = re.compile(r"^(?P<prefix>(?:diffusion_model\.)?)(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\."
                 r"(?P<proc>qkv|proj)_lora(?P<stream>[12]?)\.(?P<role>down|up)\.weight$")
TARGETS = {("qkv", "1"): "img_attn.qkv", ("proj", "1"): "img_attn.proj",
           ("qkv", "2"): "txt_attn.qkv", ("proj", "2"): "txt_attn.proj"}


def _split(key: str) -> tuple[str, str] | None:
    m = KEY.match(key)
    return (key[: m.start("role") - 1], m["role"]) if m else None


def detect(path: Path) -> bool:
    f = kohya._candidate(path)
    if f is None:
        return False
    return any(KEY.match(n) for n in read_header(f).tensors)


def read(path: Path, **_: object) -> Adapter:
    f = kohya._file(path)
    header = read_header(f)
    named, others = group_keys(header.tensors, _split, path=f)
    if others:
        raise AdapterFormatError(f"{f}: {len(others)} key(s) are not XLabs LoRA processor weights: "
                                 f"{', '.join(clip(k) for k in sorted(others)[:8])}.", path=f)
    groups = load_groups(header, named, f)
    modules: dict[str, LoraModule] = {}
    for stem, roles in sorted(groups.items()):
        m = KEY.match(stem + ".down.weight")
        if m is None or set(roles) != {"down", "up"}:
            raise AdapterFormatError(f"{f}: {clip(stem)} needs both down.weight and up.weight.", path=f, tensor=stem)
        if m["kind"] == "single" or not m["stream"]:
            raise UnsupportedAdapterError(
                f"{f}: {clip(stem)} is a single-block processor; its place in BFL's fused linear1/linear2 is not "
                "read yet.", path=f, tensor=stem)
        (dk, down), (_, up) = roles["down"], roles["up"]
        r = check_rank(f, stem, tuple(down.shape), tuple(up.shape), what="down / up")
        if down.dim() != 2 or up.dim() != 2 or int(up.shape[1]) != r:
            raise AdapterFormatError(f"{f}: {clip(stem)} has down {tuple(down.shape)} and up {tuple(up.shape)}: "
                                     "(r, in) and (out, r) are needed.", path=f, tensor=stem)
        target = f"double_blocks.{m['n']}.{TARGETS[(m['proc'], m['stream'])]}.weight"
        modules[target] = lowrank_module(target, down, up, 1.0, None, kind="linear",
                                         transposed=False, source_keys=(dk, roles["up"][0]))
    if not modules:
        raise AdapterFormatError(f"{f} holds no XLabs LoRA processors.", path=f)
    return Adapter(modules=modules, meta={"format": NAME, "metadata": dict(header.metadata)}, path=path, files=[f])
