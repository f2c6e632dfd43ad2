"""Every JSON loratools reads from a file goes through here.

Configs (``adapter_config.json``, ``config.json``, indexes), safetensors metadata values, GGUF
metadata strings and provenance records are untrusted input: a file a user downloaded may hold
anything. :func:`load_json` turns every way JSON can be broken (not UTF-8, not JSON, nested
thousands deep, a 5,000-digit number, the wrong top-level type) into one :class:`CorruptFileError`
that names the file and what it was supposed to be; the typed getters do the same for fields.
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import CorruptFileError

__all__ = ["load_json", "read_json", "get_field", "dump_json", "clip", "MAX_NAME_SHOWN", "SourcedDict", "source_of"]

T = TypeVar("T")
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_NAME_SHOWN = 200  # characters of a file-supplied name (tensor, key, pattern) a message shows


def clip(text: object, limit: int = MAX_NAME_SHOWN) -> str:
    """A name taken from a file, cut for a message: its first ``limit`` characters and '…'.

    Tensor names, config keys and patterns come from files a user downloaded; one of 100,000
    characters must not become a 100,000-character error line."""
    text = text if isinstance(text, str) else str(text)
    return text if len(text) <= limit else text[:limit] + "…"
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string", int: "an integer", float: "a number",
               bool: "true or false"}


class SourcedDict(dict):  # type: ignore[type-arg]
    """A JSON object that remembers the file it was read from, so that a check made far from the
    reading (a GGUF writer reading the base's head counts) can still name the file."""

    source: Path | None = None


def source_of(obj: object, default: str | Path | None = None) -> str | Path | None:
    """The file a :class:`SourcedDict` came from (``default`` for any other object)."""
    return getattr(obj, "source", None) or default


def _corrupt(where: str | Path | None, what: str, why: str) -> CorruptFileError:
    place = f"{where}: " if where else ""
    return CorruptFileError(f"{place}{what} is not valid: {why}.", path=where,
                            hint="The file may be damaged or written by a tool that does not follow the format; "
                            "fix or re-download it.")


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def load_json(text: str | bytes, *, where: str | Path | None = None, what: str = "JSON",
              expect: type | tuple[type, ...] | None = dict) -> Any:
    """Parse ``text``; any failure (or a top level that is not ``expect``) is a CorruptFileError
    naming ``where`` and ``what`` ("adapter_config.json", "the loratools record" …)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise _corrupt(where, what, "it is not UTF-8 text") from None
    except RecursionError:
        raise _corrupt(where, what, "it is nested too deeply") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError, int digit limits, NaN/Infinity constants
        raise _corrupt(where, what, f"it is not JSON ({str(e).splitlines()[0][:200]})") from None
    if expect is not None and not isinstance(value, expect):
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise _corrupt(where, what, f"it must be {names}, not {type(value).__name__}")
    return value


def read_json(path: Path, *, what: str | None = None, expect: type | tuple[type, ...] | None = dict) -> Any:
    """:func:`load_json` of a file (read errors other than a missing file become CorruptFileError)."""
    try:
        st = path.stat()
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise _corrupt(path, what or path.name, "it is not a regular file")
        if size > MAX_JSON_BYTES:
            raise _corrupt(path, what or path.name, f"it is {size} bytes, more than any config needs")
        data = path.read_bytes()
    except IsADirectoryError:
        raise _corrupt(path, what or path.name, "it is a folder") from None
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptFileError(f"Cannot read {path}: {e.strerror or e}.", path=path) from None
    return load_json(data, where=path, what=what or path.name, expect=expect)


def get_field(obj: dict[str, Any], key: str, kind: type[T] | tuple[type, ...], default: Any = None, *,
              where: str | Path | None = None, what: str = "config",
              check: Callable[[Any], bool] | None = None, must: str = "") -> Any:
    """``obj[key]`` when it has type ``kind`` (an int is accepted for float; bool is never an int),
    ``default`` when absent or null; anything else is a CorruptFileError naming the key."""
    value = obj.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok = float(value), True
        except OverflowError:  # an integer beyond float range
            ok = False
    if ok and isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok and check is not None and not check(value):
        ok = False
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in kinds)
        shown = _show_value(value)
        raise _corrupt(where, f"{what} field {clip(repr(key))}", f"it must be {must or names}, not {shown}")
    return value


def _show_value(value: Any) -> str:
    """repr of a JSON value, bounded in length however big or deep it is."""
    if isinstance(value, (dict, list)):
        return f"{_TYPE_NAMES[type(value)]} of {len(value)} item(s)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**20:
        return "an integer of more than 20 digits"
    return clip(repr(value), 60)


def dump_json(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, separators=None if indent else (",", ":"), ensure_ascii=False)
