"""Grouping a file's keys by module and role — every reader consumes every key or names the
leftovers. Torch-free: the PEFT plan and ``info``'s summary use it on headers alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..errors import AdapterFormatError
from ..jsonio import clip

__all__ = ["suffix_splitter", "group_keys", "refuse_leftovers"]


def suffix_splitter(suffixes: Mapping[str, str]) -> Callable[[str], tuple[str, str] | None]:
    """A key splitter for :func:`group_keys`: (stem, role) for the longest suffix a key ends with."""
    ordered = sorted(suffixes.items(), key=lambda kv: len(kv[0]), reverse=True)

    def split(key: str) -> tuple[str, str] | None:
        for suffix, role in ordered:
            if key.endswith(suffix) and len(key) > len(suffix):
                return key[: -len(suffix)], role
        return None

    return split


def group_keys(keys: Iterable[str], split: Callable[[str], tuple[str, str] | None] | Mapping[str, str], *,
               path: Path | None = None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Keys grouped by module stem: ``{stem: {role: key}}``, and the keys no rule claims.

    ``split`` is a function key → (stem, role) | None, or a mapping suffix → role. A role seen
    twice for one stem is an AdapterFormatError (two tensors claiming one place)."""
    splitter = suffix_splitter(split) if isinstance(split, Mapping) else split
    groups: dict[str, dict[str, str]] = {}
    leftovers: list[str] = []
    for key in keys:
        parts = splitter(key)
        if parts is None:
            leftovers.append(key)
            continue
        stem, role = parts
        if role in groups.get(stem, {}):
            place = f"{path}: " if path else ""
            raise AdapterFormatError(f"{place}{clip(key)} and {clip(groups[stem][role])} are both the {role} of "
                                     f"{clip(stem)}.", path=path, tensor=key)
        groups.setdefault(stem, {})[role] = key
    return groups, leftovers


def refuse_leftovers(leftovers: list[str], path: Path, *, what: str = "keys loratools does not understand",
                     hint: str = "Nothing was written.") -> None:
    """Raise AdapterFormatError naming up to eight leftover keys (a reader consumes every key)."""
    if leftovers:
        names = sorted(leftovers)
        raise AdapterFormatError(f"{path}: {len(names)} {what}: {', '.join(clip(n) for n in names[:8])}"
                                 + (" …" if len(names) > 8 else "") + ".", path=path, hint=hint)
