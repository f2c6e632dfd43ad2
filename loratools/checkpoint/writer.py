"""Atomic outputs: everything is written into a temporary folder beside the destination and moved
into place only when complete (and checked). On any failure the temporary folder is removed and the
destination is untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from types import TracebackType

from ..errors import InvalidArgumentError, OutputExistsError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', or a number of bytes (transformers' conventions: GB = 10⁹)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise InvalidArgumentError(f"Cannot read size {text!r}.", hint="Write it like 5GB, 500MB or 2GiB.")
    return int(float(m.group(1)) * _UNITS[unit])


def _inside(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output(out: Path, *, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an OUT that is, contains or lies inside an input, or exists without ``overwrite``."""
    o = out.resolve()
    for p in inputs:
        q = p.resolve()
        if o == q or _inside(q, o) or (q.is_dir() and _inside(o, q)):
            raise InvalidArgumentError(
                f"OUT ({out}) must not be {p}, contain it, or lie inside it: inputs are never modified.",
                path=out,
                hint="Choose a new folder for OUT.",
            )
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"{out} already exists.", path=out, hint="Pass --overwrite to replace it, or choose another OUT."
        )


class AtomicOutput:
    """``with AtomicOutput(out, overwrite=…) as tmp:`` write into ``tmp``; on success call
    ``commit()`` (inside the block) to move it into place; leaving the block without commit, or
    by an exception, removes ``tmp``.

    With ``single_file=True`` the temporary folder holds one file named ``out.name`` that becomes
    ``out``.
    """

    def __init__(self, out: Path, *, overwrite: bool = False, single_file: bool = False) -> None:
        self.out = Path(out)
        self.overwrite = overwrite
        self.single_file = single_file
        self.tmp = self.out.parent / f".{self.out.name}.loratools-tmp-{uuid.uuid4().hex[:8]}"
        self.committed = False
        self.stale: list[Path] = []  # companion files of a single-file OUT that a commit removes

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    @property
    def file(self) -> Path:
        return self.tmp / self.out.name

    def commit(self) -> None:
        if self.out.exists() and not self.overwrite:
            raise OutputExistsError(f"{self.out} appeared while writing.", path=self.out)
        src = self.file if self.single_file else self.tmp
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.loratools-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(src, self.out)
        self.committed = True
        if self.single_file:
            # companions written beside a single-file output (its undo data) replace their old selves
            moved = set()
            for extra in list(self.tmp.iterdir()):
                os.replace(extra, self.out.parent / extra.name)
                moved.add(extra.name)
            for stale in self.stale:
                if stale.name not in moved and stale.exists():
                    stale.unlink()
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
