"""The adapter formats loratools reads and writes, in one table.

Each format module provides:

* ``NAME``: the name users type (``--from`` / ``--to``);
* ``detect(path) -> bool``: True when the content (not the file name alone) is this format;
* ``read(path, **context) -> Adapter``: the canonical adapter; every key is consumed or the reader
  raises with the list of leftovers; context it does not use is ignored;
* ``write(adapter, out_folder, *, base_model=None, base_config=None) -> list[Path]``.

Detection tries the formats in table order; the first that claims the path reads it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..adapter import Adapter
from ..errors import AdapterFormatError, AdapterNotFoundError, InvalidArgumentError
from . import diffusers, gguf_lora, kohya, mlx, peft, raw

FORMATS: dict[str, ModuleType] = {
    peft.NAME: peft,  # a folder whose adapter_config.json has a peft_type
    mlx.NAME: mlx,  # a folder with adapters.safetensors and an MLX adapter_config.json
    kohya.NAME: kohya,  # lora_unet_… / lora_te…_ keys
    diffusers.NAME: diffusers,  # unet. / text_encoder. / transformer. prefixed PEFT-style keys
    gguf_lora.NAME: gguf_lora,  # a .gguf file
    raw.NAME: raw,  # last: it claims any file holding factor pairs
}


def detect_format(path: Path) -> str:
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    raise AdapterFormatError(
        f"{path} is not an adapter in a format loratools reads ({', '.join(FORMATS)}).",
        path=path,
        hint="A PEFT adapter is a folder with adapter_config.json and adapter_model.safetensors; a raw file "
        "holds factor pairs such as q_proj.lora_A / q_proj.lora_B.",
    )


def read_adapter(path: str | Path, *, format: str | None = None, **context: object) -> Adapter:
    """Read an adapter, detecting its format by content unless ``format`` says it.

    ``context`` is passed to the reader: ``base_config`` (GGUF names), ``allow_skip`` (kohya keys
    of network types loratools cannot apply), ``scale`` (raw factors).
    """
    path = Path(path)
    if not path.exists():
        raise AdapterNotFoundError(f"Adapter not found: {path}.", path=path)
    if format is not None and format not in FORMATS:
        raise InvalidArgumentError(f"Unknown adapter format {format!r}.", hint=f"Known: {', '.join(FORMATS)}.")
    name = format or detect_format(path)
    return FORMATS[name].read(path, **context)
