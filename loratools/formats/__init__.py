"""The adapter formats loratools reads and writes, in one table — with what each can hold.

Each format module (``formats/<name>.py``) provides:

* ``detect(path) -> bool``: True when the content (not the file name alone) is this format; it
  raises CorruptFileError when the path is clearly this format's but broken (a PEFT folder whose
  adapter_config.json is not JSON is a broken PEFT adapter, not "not an adapter");
* ``read(path, **context) -> Adapter``: the canonical adapter; every key is consumed or the reader
  raises with the list of leftovers (``common.group_keys``); context it does not use is ignored;
* ``write(adapter, out_folder, *, base_model=None, base_config=None) -> list[Path]`` for writable
  formats. Before ``write`` is called, :func:`check_can_hold` has refused what the format's
  :class:`Capabilities` say it cannot hold, so a writer only handles what it declared.

The table is data: importing it imports no format module (and no torch); a module is imported
the first time it is used. Detection tries the formats in table order.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..errors import AdapterNotFoundError, InvalidArgumentError, NotAnAdapterError, UnsupportedAdapterError

if TYPE_CHECKING:
    from ..adapter import Adapter

__all__ = ["Capabilities", "FormatSpec", "FORMATS", "READABLE", "WRITABLE", "detect_format", "read_adapter",
           "write_adapter", "cannot_hold", "check_can_hold", "spec"]


@dataclass(frozen=True)
class Capabilities:
    """What a format can hold. Writers rely on it: :func:`check_can_hold` refuses the rest."""

    deltas: frozenset[str] = frozenset({"lowrank"})  # delta kinds (deltas.py ``kind``)
    dora: bool = False  # DoRA magnitude vectors
    dora_per_input: bool = False  # the old LyCORIS per-input-column DoRA norm
    bias: bool = False  # a bias change beside ΔW (PEFT lora_bias, LyCORIS diff_b)
    conv: bool = False  # conv targets (kernels)
    embedding: bool = False  # embedding targets
    transposed: bool = False  # linear bases stored (in, out): GPT-2 Conv1D
    mixed_transposed: bool = True  # transposed and plain linear modules in one adapter
    full_tensors: bool = False  # whole tensors replacing base tensors (modules_to_save, biases)
    per_module_rank: bool = True  # else smaller ranks are padded with zeros to one rank (exact)
    per_module_scale: bool = True  # else each scale is folded into B (one rounding of B)
    several_adapters: bool = False  # one file holding several named adapters
    needs_base: bool = False  # writing needs the base model's config
    file_suffix: str | None = None  # OUT is this one file (".gguf"); None: OUT is a folder


@dataclass(frozen=True)
class FormatSpec:
    name: str
    module: str  # the module that reads (and writes) it, imported on first use
    caps: Capabilities
    writable: bool = True
    note: str = ""  # how detection recognises it

    def load(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.module}")


_SPECS = [
    FormatSpec("peft", "peft", Capabilities(deltas=frozenset({"lowrank", "loha", "lokr", "ia3"}), dora=True, bias=True,
                                            conv=True, embedding=True, transposed=True,
                                            mixed_transposed=False, full_tensors=True),
               note="a folder whose adapter_config.json has a peft_type"),
    FormatSpec("mlx", "mlx", Capabilities(dora=True, embedding=True, per_module_rank=False,
                                          per_module_scale=False),
               note="a folder with adapters.safetensors and an MLX adapter_config.json"),
    FormatSpec("kohya", "kohya", Capabilities(deltas=frozenset({"lowrank", "loha", "lokr", "full", "ia3", "oft"}), dora=True,
                                              dora_per_input=True, conv=True, bias=True),
               note="lora_unet_… / lora_te…_ keys"),
    FormatSpec("xlabs", "xlabs", Capabilities(), writable=False,
               note="double_blocks.N.processor.{qkv,proj}_lora{1,2} keys (XLabs x-flux)"),
    FormatSpec("comfy", "comfy", Capabilities(deltas=frozenset({"lowrank", "loha", "lokr", "full", "ia3", "oft"}),
                                              dora=True, dora_per_input=True, conv=True, bias=True), writable=False,
               note="diffusion_model. / text_encoders. prefixed keys with their dots (ComfyUI, BFL)"),
    FormatSpec("diffusers", "diffusers", Capabilities(dora=True, bias=True, conv=True),
               note="unet. / text_encoder. / transformer. prefixed PEFT-style keys"),
    FormatSpec("gguf", "gguf_lora", Capabilities(embedding=True, per_module_scale=False, needs_base=True,
                                                 file_suffix=".gguf"),
               note="a .gguf file"),
    FormatSpec("raw", "raw", Capabilities(), writable=False,
               note="last: any file holding factor pairs (lora_A/lora_B, U/V, …)"),
]
FORMATS: dict[str, FormatSpec] = {s.name: s for s in _SPECS}
READABLE: list[str] = [s.name for s in _SPECS]
WRITABLE: list[str] = [s.name for s in _SPECS if s.writable]


def spec(name: str, *, writing: bool = False) -> FormatSpec:
    names = WRITABLE if writing else READABLE
    if name not in names:
        raise InvalidArgumentError(f"Cannot {'write' if writing else 'read'} format {name!r}.",
                                   hint=f"{'Writable' if writing else 'Readable'} formats: {', '.join(names)}.")
    return FORMATS[name]


def cannot_hold(caps: Capabilities, adapter: Adapter) -> list[str]:
    """What of ``adapter`` a format with ``caps`` has no form for, one line each."""
    from ..jsonio import clip

    problems: list[str] = []
    if adapter.replacements and not caps.full_tensors:
        problems += [f"{clip(n)} (full tensor)" for n in sorted(adapter.replacements)]
    plain = transposed = False
    for name, m in sorted(adapter.modules.items()):
        name = clip(name)
        if m.delta.kind not in caps.deltas:
            problems.append(f"{name} ({m.delta.kind} delta)")
        if m.magnitude is not None and (not caps.dora or (m.dora_per_input and not caps.dora_per_input)):
            problems.append(f"{name} (DoRA{' per input column' if m.dora_per_input else ''})")
        if m.bias is not None and not caps.bias:
            problems.append(f"{name} (lora_bias)")
        if m.kind == "conv" and not caps.conv:
            problems.append(f"{name} (conv)")
        if m.kind == "embedding" and not caps.embedding:
            problems.append(f"{name} (embedding)")
        if m.kind == "linear":
            if m.transposed and not caps.transposed:
                problems.append(f"{name} (base stores it transposed: a Conv1D layer)")
            transposed = transposed or bool(m.transposed)
            plain = plain or not m.transposed
    if plain and transposed and caps.transposed and not caps.mixed_transposed:
        problems.append("transposed (Conv1D) and plain linear modules in one adapter")
    return problems


def check_can_hold(name: str, adapter: Adapter, *, server: str | None = None, caps: Capabilities | None = None) -> None:
    where = f"{adapter.path}: " if adapter.path is not None else ""
    if adapter.meta.get("flat_names"):
        raise InvalidArgumentError(
            f"{where}the module names of this kohya file are flattened ('.' became '_'); writing it needs the base "
            "model, whose tensor names give the dots back.",
            path=adapter.path, hint="Pass the base model (--base / base=).")
    problems = cannot_hold(caps or FORMATS[name].caps, adapter)
    if problems:
        who = server or f"the {name} format"
        kinds = any(m.delta.kind != "lowrank" and m.delta.kind not in (caps or FORMATS[name].caps).deltas
                    and getattr(m.delta, "additive", True) for m in adapter.modules.values())
        raise UnsupportedAdapterError(
            f"{where}{who} cannot hold {len(problems)} part(s) of this adapter: {', '.join(problems[:6])}"
            + (" …" if len(problems) > 6 else "") + ".",
            hint=("--to-lora --rank R turns LoHa, LoKr and full deltas into plain LoRA (the best of rank R, with "
                  "the error reported per module). " if kinds else "")
            + "Converting would lose them. Choose a format that holds them (peft holds the most), or merge "
            "the adapter into its base model instead.",
        )


def detect_format(path: Path) -> str:
    """The format of ``path`` by content: its name; a CorruptFileError when a format recognises the
    path as its own but broken; NotAnAdapterError (an AdapterFormatError) when none recognises it."""
    for s in _SPECS:
        if s.load().detect(path):
            return s.name
    raise NotAnAdapterError(
        f"{path} is not an adapter in a format loratools reads ({', '.join(READABLE)}).",
        path=path,
        hint="A PEFT adapter is a folder with adapter_config.json and adapter_model.safetensors; a raw file "
        "holds factor pairs such as q_proj.lora_A / q_proj.lora_B.",
    )


def read_adapter(path: str | Path, *, format: str | None = None, **context: Any) -> Adapter:
    """Read an adapter, detecting its format by content unless ``format`` says it.

    ``context`` is passed to the reader: ``base_config`` (GGUF names), ``allow_skip`` (kohya keys
    of network types loratools cannot apply), ``scale`` (raw factors).
    """
    path = Path(path)
    if not path.exists():
        raise AdapterNotFoundError(f"Adapter not found: {path}.", path=path)
    name = spec(format).name if format is not None else detect_format(path)
    return FORMATS[name].load().read(path, **context)


def write_adapter(adapter: Adapter, folder: Path, format: str, **context: Any) -> list[Path]:
    """Write ``adapter`` in ``format`` into the existing folder ``folder`` (checked against the
    format's capabilities first)."""
    s = spec(format, writing=True)
    check_can_hold(s.name, adapter)
    return list(s.load().write(adapter, folder, **context))
