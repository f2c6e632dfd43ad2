"""Atomic outputs: everything is written into a temporary folder beside the destination and moved
into place only when complete (and checked). On any failure — an error, Ctrl-C, SIGTERM — the
temporary folder is removed and the destination is untouched.

What ``--overwrite`` may replace is narrow (:func:`check_output`): only an output of the same
kind that loratools could have written — never an input, an ancestor of one, an adapter when a
model is written (the forgotten-OUT mistake), a symbolic link, or a folder holding files that are
not part of a model or adapter.

A run that was killed outright (SIGKILL, power loss) can leave ``.OUT.loratools-tmp-*`` (a
temporary folder) or ``.OUT.loratools-old-*`` (the previous OUT, moved aside during the final
swap). The next run for the same OUT cleans them up and says so: temporaries whose owner process
is gone are removed; a previous OUT that was moved aside is put back when OUT is missing (the swap
did not finish: roll back), and removed when OUT is there (the swap finished).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from ..errors import InvalidArgumentError, OutputExistsError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
OWNER_FILE = ".loratools-owner"

# What a model or adapter folder holds besides its weights (transformers, diffusers, PEFT, MLX,
# sentence-transformers, the Hub): anything else in an existing OUT is the user's and is never replaced.
MODEL_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json", "model_index.json",
    "scheduler_config.json", "readme.md", ".gitattributes", "license", "license.md", "license.txt",
    "adapter_config.json", "params.json", "spiece.model", "sentencepiece.bpe.model", "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json", "video_preprocessor_config.json",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
ADAPTER_MARKERS = ("adapter_config.json", "adapters.safetensors", "pytorch_lora_weights.safetensors")


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


def _is_model_side_file(p: Path, expected: set[str]) -> bool:
    name = p.name.lower()
    return (p.name in expected or name in MODEL_FILES or name.endswith(WEIGHT_SUFFIXES)
            or name.startswith(("license", "readme")) or (name.endswith(".py") and name.startswith(
                ("modeling_", "configuration_", "tokenization_", "processing_", "image_processing_"))))


def looks_like_adapter(path: Path) -> bool:
    """An adapter folder (PEFT, MLX, diffusers LoRA file), by its marker files."""
    return path.is_dir() and any((path / m).is_file() for m in ADAPTER_MARKERS)


def foreign_files(folder: Path, expected: Iterable[str] = (), depth: int = 0) -> list[str]:
    """Files in ``folder`` that are not part of a model, adapter or pipeline (relative names)."""
    found: list[str] = []
    exp = set(expected)
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            found.append(p.name)
        elif p.is_dir():
            # pipeline components (unet/, text_encoder/…) are models themselves; anything deeper is not ours
            inner = foreign_files(p, exp, depth + 1) if depth == 0 else [p.name + "/"]
            found += [f"{p.name}/{n}" for n in inner] if depth == 0 else inner
        elif not _is_model_side_file(p, exp) and not p.name.startswith(".loratools"):
            found.append(p.name)
    return found


def check_output(out: Path, *, inputs: list[Path], overwrite: bool, kind: str = "model",
                 expected: Iterable[str] = (), forgotten_out_hint: str | None = None) -> None:
    """Refuse an OUT that is, contains or lies inside an input, or exists without ``overwrite``;
    with ``overwrite``, refuse one that is not an output of ``kind`` ("model" or "adapter") that
    loratools could have written. ``expected``: names the new output will hold (the base's own
    extra files). ``forgotten_out_hint``: what to say when OUT looks like an input given by
    mistake (the command line with OUT added)."""
    o = out.absolute()
    for p in inputs:
        q = p.resolve()
        if o.resolve() == q or _inside(q, o.resolve()) or (q.is_dir() and _inside(o.resolve(), q)):
            raise InvalidArgumentError(
                f"OUT ({out}) must not be {p}, contain it, or lie inside it: inputs are never modified.",
                path=out,
                hint="Choose a new folder for OUT.",
            )
    if out.is_symlink():
        raise InvalidArgumentError(f"OUT {out} is a symbolic link; loratools writes only to the path it is given.",
                                   path=out, hint="Give the link's target as OUT, or a new path.")
    if not out.exists():
        return
    if kind == "model" and looks_like_adapter(out):
        raise OutputExistsError(
            f"OUT {out} is an adapter; a merged model would replace it.",
            path=out,
            hint=forgotten_out_hint or "Did you forget OUT? Give a new folder as the last argument.",
        )
    if kind == "adapter" and out.is_dir() and any(
            p.is_file() and p.name.startswith("model") and p.suffix == ".safetensors" for p in out.iterdir()):
        raise OutputExistsError(f"OUT {out} holds a model; an adapter would replace it.", path=out,
                                hint="Give a new folder for the adapter.")
    if not overwrite:
        raise OutputExistsError(
            f"{out} already exists.", path=out,
            hint=(forgotten_out_hint + " Or pass --overwrite to replace it.") if forgotten_out_hint else
            "Pass --overwrite to replace it, or choose another OUT.",
        )
    if out.is_dir():
        foreign = foreign_files(out, expected)
        if foreign:
            shown = ", ".join(foreign[:6]) + (" …" if len(foreign) > 6 else "")
            raise OutputExistsError(
                f"--overwrite would delete {out}, which holds files that are not part of a {kind}: {shown}.",
                path=out,
                hint="loratools only replaces what it could have written. Move those files, or choose another OUT.",
            )


# --- stale temporaries ---------------------------------------------------------------------------


def _owner_alive(tmp: Path) -> bool:
    """Whether the process that made ``tmp`` (its owner file: host, pid) still runs."""
    try:
        host, pid = (tmp / OWNER_FILE).read_text().split()[:2]
    except (OSError, ValueError):
        return False  # no owner file: left by a version that wrote none, or killed while starting
    if host != socket.gethostname():
        return True  # another machine's run on a shared disk: not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Finish or roll back what an interrupted run for ``out`` left behind; say what was done."""
    notes: list[str] = []
    if not out.parent.is_dir():
        return notes
    prefix = f".{out.name}.loratools-"
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(prefix) or p.is_symlink():
            continue
        rest = p.name[len(prefix):]
        if rest.startswith("tmp-") and p.is_dir() and not _owner_alive(p):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed {p.name}, a temporary folder an interrupted run left behind")
        elif rest.startswith("old-"):
            if not out.exists() and not out.is_symlink():
                os.replace(p, out)
                notes.append(f"put back the previous {out.name} ({p.name}): an interrupted run had moved it aside "
                             "and not replaced it")
            else:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                notes.append(f"removed {p.name}, the previous {out.name} an interrupted run had already replaced")
    return notes


class _Interrupted(SystemExit):
    pass


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(128 + signum)


class AtomicOutput:
    """``with AtomicOutput(out, overwrite=…) as tmp:`` write into ``tmp``; on success call
    ``commit()`` (inside the block) to move it into place; leaving the block without commit, or
    by an exception (SIGTERM included), removes ``tmp``. ``notes`` says what was cleaned up from
    an earlier interrupted run.

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
        self.notes: list[str] = []
        self._previous_handler: Any = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.notes += clean_stale(self.out)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        self.tmp.mkdir()
        (self.tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return self.tmp

    @property
    def file(self) -> Path:
        return self.tmp / self.out.name

    def commit(self) -> None:
        if (self.out.exists() or self.out.is_symlink()) and not self.overwrite:
            raise OutputExistsError(f"{self.out} appeared while writing.", path=self.out)
        (self.tmp / OWNER_FILE).unlink(missing_ok=True)
        src = self.file if self.single_file else self.tmp
        old = None
        if self.out.exists() or self.out.is_symlink():
            old = self.out.parent / f".{self.out.name}.loratools-old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(src, self.out)
        self.committed = True
        if self.single_file:
            # companions written beside a single-file output (its undo data) replace their old selves
            moved = set()
            for extra in list(self.tmp.iterdir()):
                target = self.out.parent / extra.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(extra, target)
                moved.add(extra.name)
            for stale in self.stale:
                if stale.name not in moved and (stale.exists() or stale.is_symlink()):
                    shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None
