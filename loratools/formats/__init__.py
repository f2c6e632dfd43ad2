"""The adapter formats loratools reads and writes, in one table.

Each format module provides:

* ``NAME``: the name users type (``--from`` / ``--to``);
* ``detect(path) -> bool``: True when the content (not the file name alone) is this format;
* ``read(path) -> Adapter``: the canonical adapter; every key is consumed or the reader raises
  with the list of leftovers;
* ``write(adapter, out_folder, **options) -> list[Path]`` where the format can be written.

Detection tries the formats in table order; the first that claims the path reads it.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from ..adapter import Adapter
from ..errors import AdapterFormatError, AdapterNotFoundError, InvalidArgumentError
from . import peft, raw

FORMATS: dict[str, ModuleType] = {
    peft.NAME: peft,
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


def read_adapter(path: str | Path, *, format: str | None = None) -> Adapter:
    path = Path(path)
    if not path.exists():
        raise AdapterNotFoundError(f"Adapter not found: {path}.", path=path)
    if format is not None and format not in FORMATS:
        raise InvalidArgumentError(f"Unknown adapter format {format!r}.", hint=f"Known: {', '.join(FORMATS)}.")
    name = format or detect_format(path)
    return FORMATS[name].read(path)
